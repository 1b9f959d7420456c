// Fused masked SGD step on the CPU: one call updates every tensor of a parameter group.
//
// All tensors are cut into fixed-size chunks and one OpenMP loop runs over the chunks of all
// tensors together, so the whole step is a single parallel region: no per-tensor dispatch, and
// one barrier per step instead of one per tensor (on a loaded 2-core machine torch's fused
// SGD, one parallel region per tensor, was seen 10-30x slower than its quiet time; ours not).
// The step is memory-bound (benchmarks/RESULTS.md has the bytes-per-element floor); masks are
// bit-packed (ong_kernels/_bitmask.py) so they add 1/8 byte per weight, not 1 byte.
//
// float32 runs the AVX-512 or AVX2 span (masked_sgd_avx512.cpp, masked_sgd_avx2.cpp) when the
// CPU has it (runtime dispatch, ong_isa.h); elsewhere the SSE2 span below (x86-64's
// baseline) or, off x86, the branch-free loop of masked_sgd_scalar.h.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

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

#if defined(__SSE2__)
// The portable float32 span on x86-64: SSE2 is the baseline, so this runs on every x86-64.
// Half a mask byte is 4 lanes (broadcast, AND with the lane's bit, compare). No FMA here: the
// mul + add pairs are the portable unit's madd, so compact_state (its scalar loop in this
// unit) is bit for bit this span. GCC did not vectorise the branch-free scalar loop
// (20 x 1M, 50% kept: 117 ms against AVX2's 26 ms, Intel, loaded).
struct Set4 {
  __m128 operator()(float x) const { return _mm_set1_ps(x); }
};

inline __m128 nibble_mask(unsigned nibble) {
  const __m128i bit = _mm_setr_epi32(1, 2, 4, 8);
  const __m128i b = _mm_and_si128(_mm_set1_epi32(static_cast<int>(nibble)), bit);
  return _mm_castsi128_ps(_mm_cmpeq_epi32(b, bit));
}

template <bool kMomentum, bool kNesterov, bool kFirst>
void update_sse2(float* __restrict p, const float* __restrict grad, float* __restrict buf,
                 const std::uint8_t* __restrict bits, std::int64_t begin, std::int64_t end,
                 const SgdHyper& h) {
  const Hyper<float, __m128, Set4> v(h);
  const __m128 neg_lr = _mm_set1_ps(-static_cast<float>(h.lr));
  const __m128 &wd = v.wd, &mom = v.mom, &damp = v.damp, &sign = v.sign;
  const bool use_wd = v.use_wd;
  std::int64_t i = begin;
  for (; i + 4 <= end; i += 4) {
    const unsigned nibble = bits == nullptr ? 0xFu : (bits[i >> 3] >> (i & 4)) & 0xFu;
    const __m128 keep = nibble_mask(nibble);
    __m128 g = _mm_and_ps(keep, _mm_mul_ps(sign, _mm_loadu_ps(grad + i)));
    const __m128 w = _mm_loadu_ps(p + i);
    if (use_wd) g = _mm_add_ps(_mm_mul_ps(wd, w), g);
    if constexpr (kMomentum) {
      __m128 b = kFirst ? g : _mm_add_ps(_mm_mul_ps(mom, _mm_loadu_ps(buf + i)), _mm_mul_ps(damp, g));
      b = _mm_and_ps(keep, b);
      _mm_storeu_ps(buf + i, b);
      g = kNesterov ? _mm_add_ps(_mm_mul_ps(mom, b), g) : b;
    }
    _mm_storeu_ps(p + i, _mm_and_ps(keep, _mm_add_ps(_mm_mul_ps(neg_lr, g), w)));
  }
  update_scalar<float, kMomentum, kNesterov, kFirst>(p, grad, buf, bits, i, end, h);
}

void span_f32_sse2(float* p, const float* grad, float* buf, const std::uint8_t* bits,
                   std::int64_t begin, std::int64_t end, const SgdHyper& h) {
  with_flags(h, [&](auto m, auto n, auto f) {
    update_sse2<decltype(m)::value, decltype(n)::value, decltype(f)::value>(p, grad, buf, bits,
                                                                            begin, end, h);
  });
}
#endif

// Each ISA's dense and compact float32 spans come from one unit (one madd: an FMA in the
// AVX2 and AVX-512 units, mul + add in this portable one), so compact_state is dense mode bit
// for bit under every ISA. float64 runs this unit's loops under every ISA.
template <typename T>
SpanFn<T> pick_span() {
#ifdef ONG_HAVE_X86_KERNELS
  if constexpr (std::is_same_v<T, float>) {
    if (active_isa() == Isa::kAvx512) return masked_sgd_span_f32_avx512;
    if (active_isa() == Isa::kAvx2) return masked_sgd_span_f32_avx2;
  }
#endif
#if defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) return span_f32_sse2;
#endif
  return update_scalar_dispatch<T>;
}

template <typename T>
using CompactFn = void (*)(T*, const T*, T*, const std::uint8_t*, std::int64_t, std::int64_t,
                           std::int64_t, std::int64_t, const SgdHyper&);

#ifdef ONG_HAVE_X86_KERNELS
// Each x86 ISA has two compact spans, the same arithmetic in one unit (the choice never changes
// a result), whose speed differs by vendor; the first compact step under an ISA times both on
// 64K float32 weights in cache (the instruction cost decides, not memory) and keeps the faster.
// - AVX-512: vexpandps / vcompressps (register forms) or the set-bit loop. The memory forms are
//   microcoded on AMD Zen 4 (issue 17 measured that step 2.4x slower than dense there). Timed
//   at 50% kept, where the vector span does 2 groups of 16 per 64 weights and the set-bit loop
//   32 single elements: on the Intel VM the vector span wins there (and on 20 x 1M weights it
//   ran 0.96x the set-bit loop at 10% kept, 0.75x at 50%); at 10% kept in cache the set-bit
//   loop won instead, the opposite of the memory-bound result, so 10% is not the point.
// - AVX2: the set-bit loop below 1/12 kept and the block loop above ("vector", the Intel VM's
//   faster), or the set-bit loop up to 1/2 kept ("setbits", AMD Zen 3's faster: 0.67-0.74x
//   dense against 0.75-0.89x at 10-30% kept, 40 x 1M weights; masked_sgd_avx2.cpp). Timed at
//   25% kept, between the two thresholds.
enum CompactPath : int { kUnmeasured = -1, kVector = 0, kSetBits = 1 };
// One choice per x86 ISA (index: Isa::kAvx2 - 1, Isa::kAvx512 - 1).
std::atomic<int> g_compact_path[2] = {kUnmeasured, kUnmeasured};

double time_compact(CompactFn<float> fn, unsigned kept_of_four) {
  constexpr std::int64_t n = 1 << 16;
  std::vector<float> p(n, 0.5f), grad(n, 0.25f), cbuf(n, 0.0f);
  std::vector<std::uint8_t> bits(n / 8, 0);
  std::uint32_t state = 12345u;
  std::int64_t kept = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    state = state * 1664525u + 1013904223u;  // LCG: a fixed random mask
    if (((state >> 8) & 3u) < kept_of_four) {
      bits[i >> 3] |= static_cast<std::uint8_t>(1u << (i & 7));
      ++kept;
    }
  }
  SgdHyper h{1e-3, 0.9, 0.0, 0.0, false, false, false, 0, 0};
  double best = 1e30;
  for (int rep = 0; rep < 7; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    fn(p.data(), grad.data(), cbuf.data(), bits.data(), 0, n, 0, kept, h);
    const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
    best = std::min(best, dt.count());
  }
  return best;
}

struct CompactPair {
  CompactFn<float> vector;
  CompactFn<float> setbits;
  unsigned kept_of_four;  // the calibration point
};

CompactPair compact_pair(Isa isa) {
  if (isa == Isa::kAvx512) {
    return {masked_sgd_compact_f32_avx512, masked_sgd_compact_f32_avx512_setbits, 2};
  }
  return {masked_sgd_compact_f32_avx2, masked_sgd_compact_f32_avx2_setbits, 1};
}

// The chosen span of an x86 ISA (kAvx2 or kAvx512), measured on first use.
CompactFn<float> x86_compact(Isa isa) {
  const CompactPair pair = compact_pair(isa);
  std::atomic<int>& chosen = g_compact_path[static_cast<int>(isa) - 1];
  int path = chosen.load(std::memory_order_relaxed);
  if (path == kUnmeasured) {
    const double vec = time_compact(pair.vector, pair.kept_of_four);
    const double setbits = time_compact(pair.setbits, pair.kept_of_four);
    int expected = kUnmeasured;
    chosen.compare_exchange_strong(expected, vec <= setbits ? kVector : kSetBits);
    path = chosen.load();
  }
  return path == kVector ? pair.vector : pair.setbits;
}
#endif

template <typename T>
CompactFn<T> pick_compact() {
#ifdef ONG_HAVE_X86_KERNELS
  if constexpr (std::is_same_v<T, float>) {
    if (active_isa() != Isa::kPortable) return x86_compact(active_isa());
  }
#endif
  return update_compact_dispatch<T>;
}

// A kernel's share of one tensor: kChunk elements (fewer at its end); `index` is the chunk's
// number within the tensor (the compact offsets' index).
struct Chunk {
  std::int64_t tensor;
  std::int64_t index;
  std::int64_t begin;
  std::int64_t end;
};

template <typename T>
void run_chunk(SpanFn<T> update, const SgdTensor& t, const Chunk& ch, const SgdHyper& h) {
  update(reinterpret_cast<T*>(t.param), reinterpret_cast<const T*>(t.grad),
         reinterpret_cast<T*>(t.buf), reinterpret_cast<const std::uint8_t*>(t.mask), ch.begin,
         ch.end, h);
}

template <typename T>
void run_chunk(CompactFn<T> update, const SgdCompactTensor& t, const Chunk& ch,
               const SgdHyper& h) {
  const auto* offsets = reinterpret_cast<const std::int64_t*>(t.offsets);
  update(reinterpret_cast<T*>(t.param), reinterpret_cast<const T*>(t.grad),
         reinterpret_cast<T*>(t.buf), reinterpret_cast<const std::uint8_t*>(t.mask), ch.begin,
         ch.end, offsets[ch.index], t.buf_numel, h);
}

// Every tensor of a table (Row: SgdTensor or SgdCompactTensor) in one parallel loop over the
// chunks of all of them.
template <typename T, typename Row>
void step_all(const Row* tensors, std::int64_t n_tensors, const SgdHyper& h, int num_threads) {
  std::vector<Chunk> chunks;
  for (std::int64_t t = 0; t < n_tensors; ++t) {
    std::int64_t c = 0;
    for (std::int64_t b = 0; b < tensors[t].numel; b += kChunk, ++c) {
      chunks.push_back({t, c, b, std::min(b + kChunk, tensors[t].numel)});
    }
  }
  const auto update = [] {
    if constexpr (std::is_same_v<Row, SgdCompactTensor>) {
      return pick_compact<T>();
    } else {
      return pick_span<T>();
    }
  }();
  const auto n_chunks = static_cast<std::int64_t>(chunks.size());
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (std::int64_t c = 0; c < n_chunks; ++c) {
    run_chunk<T>(update, tensors[chunks[c].tensor], chunks[c], h);
  }
}

// Every tensor of one dtype of a dense (SgdTensor) or compact (SgdCompactTensor) table.
template <typename Row>
void step_table(const Row* table, std::int64_t n_tensors, DType dtype, const SgdHyper& h,
                int num_threads, const char* what) {
  if (num_threads < 1) num_threads = 1;
  // GradScaler found an inf/NaN: the step changes nothing (read once, on the host).
  if (h.found_inf != 0 && *reinterpret_cast<const float*>(h.found_inf) != 0.0f) return;
  switch (dtype) {
    case DType::kFloat32:
      return step_all<float>(table, n_tensors, h, num_threads);
    case DType::kFloat64:
      return step_all<double>(table, n_tensors, h, num_threads);
    default:
      unsupported_dtype(what, dtype);
  }
}

}  // namespace

std::int64_t masked_sgd_chunk_size_cpu() { return kChunk; }

const char* masked_sgd_compact_path_cpu() {
#ifdef ONG_HAVE_X86_KERNELS
  const Isa isa = active_isa();
  if (isa != Isa::kPortable) {
    return x86_compact(isa) == compact_pair(isa).vector ? "vector" : "setbits";
  }
#endif
  return "setbits";
}

void set_masked_sgd_compact_path_cpu(const char* name) {
  const std::string value(name);
  if (value != "vector" && value != "setbits") {
    throw std::invalid_argument("compact path must be 'vector' or 'setbits', got '" + value + "'");
  }
#ifdef ONG_HAVE_X86_KERNELS
  const Isa isa = active_isa();
  if (isa != Isa::kPortable) {
    g_compact_path[static_cast<int>(isa) - 1].store(value == "vector" ? kVector : kSetBits);
  }
#endif
}

void masked_sgd_step_compact_cpu(const SgdCompactTensor* table, std::int64_t n_tensors,
                                 DType dtype, const SgdHyper& h, int num_threads) {
  step_table(table, n_tensors, dtype, h, num_threads,
             "masked_sgd_step_compact_cpu (float32, float64)");
}

void masked_sgd_step_cpu(const SgdTensor* table, std::int64_t n_tensors, DType dtype,
                         const SgdHyper& h, int num_threads) {
  step_table(table, n_tensors, dtype, h, num_threads, "masked_sgd_step_cpu (float32, float64)");
}

}  // namespace ong
