// Fused masked SGD step on the CPU: one call updates every tensor of a parameter group.
//
// All tensors are cut into fixed-size chunks and one OpenMP loop runs over the chunks of all
// tensors together, so the whole step is a single parallel region: no per-tensor dispatch, and
// one barrier per step instead of one per tensor (on a loaded 2-core machine torch's fused
// SGD, one parallel region per tensor, was seen 10-30x slower than its quiet time; ours not).
// The step is memory-bound (benchmarks/RESULTS.md has the bytes-per-element floor); masks are
// bit-packed (ong_kernels/_bitmask.py) so they add 1/8 byte per weight, not 1 byte.
//
// float32 runs the AVX-512 span (masked_sgd_avx512.cpp) when the CPU has it (runtime
// dispatch, ong_isa.h); elsewhere the scalar loop with the same selects runs.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "masked_sgd_scalar.h"
#include "ong_isa.h"
#include "ong_sgd.h"

namespace ong {
namespace {

// 16K elements = 64 KiB per float32 array per chunk: large enough to amortise scheduling, small
// enough that ResNet-18's 11M weights give ~700 chunks to balance over the cores. A multiple
// of 16 so every chunk starts on a mask byte (and an AVX-512 mask word) boundary.
constexpr std::int64_t kChunk = 1 << 14;

template <typename T>
using SpanFn = void (*)(T*, const T*, T*, const std::uint8_t*, std::int64_t, std::int64_t,
                        const SgdHyper&);

template <typename T>
SpanFn<T> pick_span() {
#ifdef ONG_HAVE_X86_KERNELS
  if constexpr (std::is_same_v<T, float>) {
    if (active_isa() == Isa::kAvx512) return masked_sgd_span_f32_avx512;
  }
#endif
  return update_scalar_dispatch<T>;
}

template <typename T>
void step_all(const SgdTensor* tensors, std::int64_t n_tensors, const SgdHyper& h,
              int num_threads) {
  struct Chunk {
    std::int64_t tensor;
    std::int64_t begin;
    std::int64_t end;
  };
  std::vector<Chunk> chunks;
  for (std::int64_t t = 0; t < n_tensors; ++t) {
    for (std::int64_t b = 0; b < tensors[t].numel; b += kChunk) {
      chunks.push_back({t, b, std::min(b + kChunk, tensors[t].numel)});
    }
  }
  const SpanFn<T> update = pick_span<T>();
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

template <typename T>
using CompactFn = void (*)(T*, const T*, T*, const std::uint8_t*, std::int64_t, std::int64_t,
                           std::int64_t, std::int64_t, const SgdHyper&);

template <typename T>
CompactFn<T> pick_compact() {
#ifdef ONG_HAVE_X86_KERNELS
  if constexpr (std::is_same_v<T, float>) {
    // the unit whose madd is an FMA, like the dense AVX-512 span: bit-for-bit dense mode
    if (active_isa() == Isa::kAvx512) return masked_sgd_compact_f32_avx512;
  }
#endif
  return update_compact_dispatch<T>;
}

template <typename T>
void compact_all(const SgdCompactTensor* tensors, std::int64_t n_tensors, const SgdHyper& h,
                 int num_threads) {
  struct Chunk {
    std::int64_t tensor;
    std::int64_t index;
    std::int64_t begin;
    std::int64_t end;
  };
  std::vector<Chunk> chunks;
  for (std::int64_t t = 0; t < n_tensors; ++t) {
    std::int64_t c = 0;
    for (std::int64_t b = 0; b < tensors[t].numel; b += kChunk, ++c) {
      chunks.push_back({t, c, b, std::min(b + kChunk, tensors[t].numel)});
    }
  }
  const CompactFn<T> update = pick_compact<T>();
  const auto n_chunks = static_cast<std::int64_t>(chunks.size());
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (std::int64_t c = 0; c < n_chunks; ++c) {
    const Chunk& ch = chunks[c];
    const SgdCompactTensor& t = tensors[ch.tensor];
    const auto* offsets = reinterpret_cast<const std::int64_t*>(t.offsets);
    update(reinterpret_cast<T*>(t.param), reinterpret_cast<const T*>(t.grad),
           reinterpret_cast<T*>(t.buf), reinterpret_cast<const std::uint8_t*>(t.mask), ch.begin,
           ch.end, offsets[ch.index], t.buf_numel, h);
  }
}

}  // namespace

std::int64_t masked_sgd_chunk_size_cpu() { return kChunk; }

void masked_sgd_step_compact_cpu(const SgdCompactTensor* table, std::int64_t n_tensors,
                                 DType dtype, const SgdHyper& h, int num_threads) {
  if (num_threads < 1) num_threads = 1;
  if (h.found_inf != 0 && *reinterpret_cast<const float*>(h.found_inf) != 0.0f) return;
  switch (dtype) {
    case DType::kFloat32:
      compact_all<float>(table, n_tensors, h, num_threads);
      break;
    case DType::kFloat64:
      compact_all<double>(table, n_tensors, h, num_threads);
      break;
    default:
      unsupported_dtype("masked_sgd_step_compact_cpu (float32, float64)", dtype);
  }
}

void masked_sgd_step_cpu(const SgdTensor* table, std::int64_t n_tensors, DType dtype,
                         const SgdHyper& h, int num_threads) {
  if (num_threads < 1) num_threads = 1;
  // GradScaler found an inf/NaN: the step changes nothing (read once, on the host).
  if (h.found_inf != 0 && *reinterpret_cast<const float*>(h.found_inf) != 0.0f) return;
  switch (dtype) {
    case DType::kFloat32:
      step_all<float>(table, n_tensors, h, num_threads);
      break;
    case DType::kFloat64:
      step_all<double>(table, n_tensors, h, num_threads);
      break;
    default:
      unsupported_dtype("masked_sgd_step_cpu (float32, float64)", dtype);
  }
}

}  // namespace ong
