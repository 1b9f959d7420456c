// The scalar masked-SGD loop, included by each CPU unit that needs it (inside an anonymous
// namespace, so every unit keeps its own copy compiled for its own ISA).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "ong_sgd.h"

namespace ong {
namespace {

// a * b + c: one fused multiply-add in a unit compiled with FMA (the AVX-512 unit, whose
// vector loop uses the same association), two roundings elsewhere. Written out so that
// dense and compact steps round identically in each unit (compact_state is bit-for-bit
// dense mode).
template <typename T>
inline T madd(T a, T b, T c) {
#ifdef __FMA__
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

inline bool kept(const std::uint8_t* bits, std::int64_t i) { return (bits[i >> 3] >> (i & 7)) & 1; }

// The 64 mask bits of weights [i, i + 64) (i a multiple of 8; all 8 bytes inside the mask).
inline std::uint64_t mask_word(const std::uint8_t* bits, std::int64_t i) {
  std::uint64_t word;
  std::memcpy(&word, bits + (i >> 3), sizeof(word));
  return word;
}

// The step's scalars in T (float for the float32 spans, T for the scalar loops), each passed
// through `set` (a vector unit's set1 broadcast; by default the scalar itself): one place
// that reads them from SgdHyper for every span. `sign` folds maximize and GradScaler's
// unscale (grad_scale is a host address here).
struct Scalar {
  template <typename T>
  T operator()(T x) const { return x; }
};

template <typename T, typename V = T, typename Set = Scalar>
struct Hyper {
  V lr, wd, mom, damp, sign;
  bool use_wd;
  explicit Hyper(const SgdHyper& h, Set set = {})
      : lr(set(static_cast<T>(h.lr))),
        wd(set(static_cast<T>(h.weight_decay))),
        mom(set(static_cast<T>(h.momentum))),
        damp(set(static_cast<T>(1.0 - h.dampening))),
        sign(set(static_cast<T>(grad_sign(h, h.grad_scale ? host_unscale(h) : 1.0f)))),
        use_wd(h.weight_decay != 0.0) {}
};

// Elements [begin, end) of one tensor; `bits` == nullptr for a dense tensor. Written without
// a branch on the mask: one mask byte is 8 lanes whose value is selected (keep ? x : 0, with
// x computed either way). The per-element branch it replaces ran 6x slower than AVX-512 at
// 50% kept (issue 17: mispredictions on a random mask); this loop runs 2x faster there, and
// is the vector spans' tail and the float64 path (x86 float32 has its SSE2/AVX2/AVX-512 spans).
template <typename T, bool kMomentum, bool kNesterov, bool kFirst>
void update_scalar(T* __restrict p, const T* __restrict grad, T* __restrict buf,
                   const std::uint8_t* __restrict bits, std::int64_t begin, std::int64_t end,
                   const SgdHyper& h) {
  const Hyper<T> v(h);
  const T lr = v.lr, wd = v.wd, mom = v.mom, damp = v.damp, sign = v.sign;
  const auto one = [&](std::int64_t i, bool keep, bool use_wd) {
    // Select, never multiply: a NaN/Inf gradient at a pruned position must not reach p or buf.
    T g = keep ? sign * grad[i] : T(0);
    const T w = p[i];
    if (use_wd) g = madd(wd, w, g);
    if constexpr (kMomentum) {
      T b = kFirst ? g : madd(mom, buf[i], damp * g);
      b = keep ? b : T(0);
      buf[i] = b;
      g = kNesterov ? madd(mom, b, g) : b;
    }
    p[i] = keep ? madd(-lr, g, w) : T(0);
  };
  const auto groups = [&](bool use_wd) {
    std::int64_t i = begin;
    if ((begin & 7) == 0) {
      for (; i + 8 <= end; i += 8) {
        const unsigned byte = bits == nullptr ? 0xFFu : bits[i >> 3];
        for (int j = 0; j < 8; ++j) one(i + j, (byte >> j) & 1u, use_wd);
      }
    }
    for (; i < end; ++i) one(i, bits == nullptr || kept(bits, i), use_wd);
  };
  // two copies of the loop rather than a test per element
  if (wd != T(0)) {
    groups(true);
  } else {
    groups(false);
  }
}

// Software prefetch of 64 weights' lines of an array (p, the gradient) kPrefetchAhead weights
// ahead of a span's 64-weight block. The compact spans read only lines that hold a kept weight, which left the
// hardware prefetchers behind: ResNet-18 at 90%, 2 threads, Intel VM, AVX-512 compact/dense
// step 0.89 -> 0.78-0.80 at 512 ahead (256: 0.79-0.80, 1024: 0.83, 2048: 0.82-0.87); with
// the prefetch kept inside each 16K-weight chunk it gained only 0.89 -> 0.86 (the next chunk,
// the same thread's under the static schedule, is where the first 512 weights come from).
// So it may reach up to 2 KiB past a span: a prefetch is a hint that never faults and never
// changes memory, and the address is formed as an integer (no out-of-range pointer).
constexpr std::int64_t kPrefetchAhead = 512;

// The dense spans (64 weights per call, p, grad and the momentum buffer) gain from it too,
// though they read every line: ResNet-18 at 90%, 2 threads, Intel VM, dense step with AVX2
// 5.3 -> 4.5-4.6 ms (0.98-1.09x SGD(fused=True) at ATEN_CPU_CAPABILITY=avx2, was 1.09-1.16x),
// with AVX-512 4.60-4.70 -> 4.51-4.57 ms: the hardware prefetchers restart at every 16K chunk
// and every tensor of the step.
template <typename T>
inline void prefetch_ahead(const T* a) {
  constexpr std::uintptr_t kAheadBytes = kPrefetchAhead * sizeof(T);
  const auto base = reinterpret_cast<std::uintptr_t>(a) + kAheadBytes;
  for (std::uintptr_t line = 0; line < 64 * sizeof(T); line += 64) {
    __builtin_prefetch(reinterpret_cast<const void*>(base + line), 0);
  }
}

template <typename T>
inline void prefetch_ahead(const T* p, const T* grad) {
  prefetch_ahead(p);
  prefetch_ahead(grad);
}

// A 64-weight block of a compact span as kGroups groups of 64 / kGroups weights (one vector
// each): group j's mask bits, its kept count n[j], the offset at[j] of its first packed
// momentum entry and the offset after the block. The AVX2 span takes 8 groups of 8, the
// AVX-512 span 4 of 16.
template <int kGroups>
struct CompactBlock {
  unsigned group[kGroups];
  int n[kGroups];
  std::int64_t at[kGroups];
  std::int64_t next;
};

// The block of weights [i, i + 64) with its packed momentum from offset k; false when no
// weight of it is kept (the caller skips it). Prefetches the weights and gradients ahead.
template <int kGroups>
inline bool read_block(const std::uint8_t* bits, const float* p, const float* grad, std::int64_t i,
                       std::int64_t k, CompactBlock<kGroups>& b) {
  constexpr int kWidth = 64 / kGroups;
  constexpr std::uint64_t kLow = (std::uint64_t{1} << kWidth) - 1;
  prefetch_ahead(p + i, grad + i);  // why, and the distance: prefetch_ahead
  const std::uint64_t word = mask_word(bits, i);
  if (word == 0) return false;
#pragma GCC unroll 8
  for (int j = 0; j < kGroups; ++j) {
    b.group[j] = static_cast<unsigned>((word >> (kWidth * j)) & kLow);
    b.n[j] = __builtin_popcount(b.group[j]);
    b.at[j] = k;
    k += b.n[j];
  }
  b.next = k;
  return true;
}

// compact_state: the kept elements of [begin, end) only (begin a multiple of 8); the
// momentum of the k-th kept element of the span is cbuf[buf_begin + k]. Pruned weights are
// neither read nor written (they were zeroed when the mask was set). Same arithmetic as
// update_scalar, element by element.
template <typename T, bool kMomentum, bool kNesterov, bool kFirst>
void update_compact(T* __restrict p, const T* __restrict grad, T* __restrict cbuf,
                    const std::uint8_t* __restrict bits, std::int64_t begin, std::int64_t end,
                    std::int64_t buf_begin, std::int64_t buf_numel, const SgdHyper& h) {
  const Hyper<T> v(h);
  const T lr = v.lr, wd = v.wd, mom = v.mom, damp = v.damp, sign = v.sign;
  std::int64_t k = buf_begin;
  for (std::int64_t base = begin; base < end; base += 64) {
    prefetch_ahead(p + base, grad + base);
    // up to 8 mask bytes; never a byte past the span's last one (the mask's end)
    const std::int64_t n_bytes = std::min<std::int64_t>(8, (end - base + 7) >> 3);
    std::uint64_t word = 0;
    std::memcpy(&word, bits + (base >> 3), static_cast<std::size_t>(n_bytes));
    if (end - base < 64) word &= (std::uint64_t(1) << (end - base)) - 1;
    while (word != 0) {
      const std::int64_t i = base + __builtin_ctzll(word);
      word &= word - 1;
      // bits and offsets that disagree with the buffer cannot make us write outside it
      if constexpr (kMomentum) {
        if (static_cast<std::uint64_t>(k) >= static_cast<std::uint64_t>(buf_numel)) return;
      }
      T g = sign * grad[i];
      const T w = p[i];
      if (wd != T(0)) g = madd(wd, w, g);
      if constexpr (kMomentum) {
        const T b = kFirst ? g : madd(mom, cbuf[k], damp * g);
        cbuf[k] = b;
        g = kNesterov ? madd(mom, b, g) : b;
      }
      ++k;
      p[i] = madd(-lr, g, w);
    }
  }
}

// update_compact and update_scalar with the flags of `h` as template arguments.
template <typename T>
void update_compact_dispatch(T* p, const T* grad, T* cbuf, const std::uint8_t* bits,
                             std::int64_t begin, std::int64_t end, std::int64_t buf_begin,
                             std::int64_t buf_numel, const SgdHyper& h) {
  with_flags(h, [&](auto m, auto n, auto f) {
    update_compact<T, decltype(m)::value, decltype(n)::value, decltype(f)::value>(
        p, grad, cbuf, bits, begin, end, buf_begin, buf_numel, h);
  });
}

template <typename T>
void update_scalar_dispatch(T* p, const T* grad, T* buf, const std::uint8_t* bits,
                            std::int64_t begin, std::int64_t end, const SgdHyper& h) {
  with_flags(h, [&](auto m, auto n, auto f) {
    update_scalar<T, decltype(m)::value, decltype(n)::value, decltype(f)::value>(
        p, grad, buf, bits, begin, end, h);
  });
}

}  // namespace
}  // namespace ong
