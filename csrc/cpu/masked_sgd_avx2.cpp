// The AVX2 float32 masked-SGD spans, dense and compact (compiled with -mavx2 -mfma; called
// only after runtime detection, see ong_isa.h). A CPU without AVX-512 (AMD Zen 2/3, Intel
// client parts) ran the scalar loop before: issue 17 measured it 2.2-2.4x slower than
// SGD(fused=True) on a ResNet-18 step, and 5.7x slower than AVX-512 at 50% kept.
//
// One mask byte is 8 lanes: the byte broadcast, AND-ed with (1, 2, ..., 128) and compared
// gives the lane mask, so the loop has no branch on the mask. Pruned lanes are selected to 0
// (an AND, never a multiply: a NaN gradient there cannot leak). The arithmetic is the scalar
// loop's of this unit (madd = one FMA, same association), so the compact span's trajectory
// is the dense span's bit for bit.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "masked_sgd_scalar.h"
#include "ong_sgd.h"

namespace ong {
namespace {

inline __m256 lane_mask(unsigned byte) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i b = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(byte)), bit);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(b, bit));
}

struct Set8 {
  __m256 operator()(float x) const { return _mm256_set1_ps(x); }
};

// The hyper-parameters broadcast to 8 lanes, and the step's arithmetic on 8 lanes, shared by
// the dense and the compact span (one FMA per madd, the same association: the compact
// trajectory is the dense one bit for bit).
struct Lanes : Hyper<float, __m256, Set8> {
  explicit Lanes(const SgdHyper& h) : Hyper(h) {}
  // The masked, unscaled, decayed gradient of lanes `keep`.
  __m256 gradient(__m256 keep, const float* grad, __m256 w) const {
    __m256 g = _mm256_and_ps(keep, _mm256_mul_ps(sign, _mm256_loadu_ps(grad)));
    return use_wd ? _mm256_fmadd_ps(wd, w, g) : g;
  }
  // The new momentum from the old one (ignored on a first step).
  template <bool kFirst>
  __m256 momentum(__m256 old, __m256 g) const {
    return kFirst ? g : _mm256_fmadd_ps(mom, old, _mm256_mul_ps(damp, g));
  }
  template <bool kNesterov>
  __m256 direction(__m256 b, __m256 g) const {
    return kNesterov ? _mm256_fmadd_ps(mom, b, g) : b;
  }
  __m256 weight(__m256 keep, __m256 w, __m256 g) const {
    return _mm256_and_ps(keep, _mm256_fnmadd_ps(lr, g, w));
  }
};

template <bool kMomentum, bool kNesterov, bool kFirst>
void update_avx2(float* __restrict p, const float* __restrict grad, float* __restrict buf,
                 const std::uint8_t* __restrict bits, std::int64_t begin, std::int64_t end,
                 const SgdHyper& h) {
  const Lanes v(h);
  const __m256 all = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  std::int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    if ((i & 63) == 0) {  // masked_sgd_scalar.h: why, and the measurement
      prefetch_ahead(p + i, grad + i);
      if constexpr (kMomentum) prefetch_ahead(buf + i);
    }
    const __m256 keep = bits != nullptr ? lane_mask(bits[i >> 3]) : all;
    const __m256 w = _mm256_loadu_ps(p + i);
    __m256 g = v.gradient(keep, grad + i, w);
    if constexpr (kMomentum) {
      const __m256 b = _mm256_and_ps(keep, v.momentum<kFirst>(_mm256_loadu_ps(buf + i), g));
      _mm256_storeu_ps(buf + i, b);
      g = v.direction<kNesterov>(b, g);
    }
    _mm256_storeu_ps(p + i, v.weight(keep, w, g));
  }
  update_scalar<float, kMomentum, kNesterov, kFirst>(p, grad, buf, bits, i, end, h);
}

// compact_state without compress/expand instructions: a per-byte permutation. expand[b][j]
// = which of the packed values lane j of byte b takes; compress[b][r] = the lane of the r-th
// kept element of byte b. 2 x 8 KiB, built once.
struct PermTables {
  alignas(32) std::int32_t expand[256][8];
  alignas(32) std::int32_t compress[256][8];
  PermTables() {
    for (int b = 0; b < 256; ++b) {
      for (int j = 0; j < 8; ++j) expand[b][j] = compress[b][j] = 0;
      int r = 0;
      for (int j = 0; j < 8; ++j) {
        if ((b >> j) & 1) {
          expand[b][j] = r;
          compress[b][r++] = j;
        }
      }
    }
  }
};
const PermTables kPerm;

inline __m256 first_lanes(int n) {
  return _mm256_castsi256_ps(
      _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

inline __m256i perm(const std::int32_t* row) {
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(row));
}

// Kept elements of [begin, end) (begin a multiple of 8): the compact entries this span owns.
inline std::int64_t kept_in(const std::uint8_t* bits, std::int64_t begin, std::int64_t end) {
  std::int64_t n = 0;
  std::int64_t i = begin;
  for (; i + 64 <= end; i += 64) {
    std::uint64_t word;
    std::memcpy(&word, bits + (i >> 3), sizeof(word));
    n += __builtin_popcountll(word);
  }
  for (; i < end; ++i) n += kept(bits, i);
  return n;
}

// compact_state, 64 weights (8 mask bytes) per block, full-width loads and stores only
// (vmaskmovps stores are slow on AMD Zen 2/3, and a maskload/maskstore version ran 36 ms
// against the dense span's 26.9 ms here, 20 x 1M float32, 10% kept). Each byte's packed
// momentum is loaded with the 8 entries from its start and permuted to the kept lanes; the
// new values are permuted back to the front and stored with the loaded values in the
// other lanes. All 8 loads of a block precede its 8 stores (a load right after the previous
// byte's store of the same line waits for it: written byte by byte this form ran 27.7 ms),
// and the stores go in order, so each entry ends with its new value. The write-back never
// leaves this span's entries (next + 8 <= kend: no other thread's chunk); the span's last
// kept elements take the set-bit loop. Pruned weights are selected to 0 as in the dense span
// (they are 0 already: the mask zeroed them).
// Spans with fewer than 1 / kSparseBelow of their weights kept take the set-bit loop, which
// touches only kept weights; the run-time measurement in masked_sgd.cpp picks the threshold.
template <int kSparseBelow, bool kMomentum, bool kNesterov, bool kFirst>
void compact_avx2(float* __restrict p, const float* __restrict grad, float* __restrict cbuf,
                  const std::uint8_t* __restrict bits, std::int64_t begin, std::int64_t end,
                  std::int64_t buf_begin, std::int64_t buf_numel, const SgdHyper& h) {
  const Lanes v(h);
  std::int64_t k = buf_begin;
  const std::int64_t span_kept = kept_in(bits, begin, end);
  if (kSparseBelow * span_kept < end - begin) {
    return update_compact<float, kMomentum, kNesterov, kFirst>(p, grad, cbuf, bits, begin, end,
                                                               k, buf_numel, h);
  }
  // bits and offsets that disagree with the buffer cannot make us touch memory past it
  const std::int64_t kend = std::min(buf_begin + span_kept, buf_numel);
  std::int64_t i = begin;
  for (; i + 64 <= end; i += 64) {
    CompactBlock<8> blk;
    if (!read_block(bits, p, grad, i, k, blk)) continue;
    if constexpr (kMomentum) {
      if (k < 0 || blk.next + 8 > kend) break;
    }
    __m256 packed[8], b[8], w_new[8];
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      const __m256 keep = lane_mask(blk.group[j]);
      const __m256 w = _mm256_loadu_ps(p + i + 8 * j);
      __m256 g = v.gradient(keep, grad + i + 8 * j, w);
      if constexpr (kMomentum) {
        packed[j] = _mm256_loadu_ps(cbuf + blk.at[j]);
        const __m256 old = kFirst ? packed[j]
                                  : _mm256_permutevar8x32_ps(packed[j],
                                                             perm(kPerm.expand[blk.group[j]]));
        b[j] = v.momentum<kFirst>(old, g);
        g = v.direction<kNesterov>(b[j], g);
      }
      w_new[j] = v.weight(keep, w, g);
    }
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      if constexpr (kMomentum) {
        const __m256 front = _mm256_permutevar8x32_ps(b[j], perm(kPerm.compress[blk.group[j]]));
        const __m256 kept_front = _mm256_blendv_ps(packed[j], front, first_lanes(blk.n[j]));
        _mm256_storeu_ps(cbuf + blk.at[j], kept_front);
      }
      _mm256_storeu_ps(p + i + 8 * j, w_new[j]);
    }
    k = blk.next;
  }
  update_compact<float, kMomentum, kNesterov, kFirst>(p, grad, cbuf, bits, i, end, k, buf_numel,
                                                      h);
}

}  // namespace

void masked_sgd_span_f32_avx2(float* p, const float* grad, float* buf, const std::uint8_t* bits,
                              std::int64_t begin, std::int64_t end, const SgdHyper& h) {
  with_flags(h, [&](auto m, auto n, auto f) {
    update_avx2<decltype(m)::value, decltype(n)::value, decltype(f)::value>(p, grad, buf, bits,
                                                                            begin, end, h);
  });
}

// The two thresholds of the set-bit loop (1 / kSparseBelow kept), measured with the prefetch
// in both loops (20 x 1M float32, momentum, 2 threads; ms, set-bit / block):
// - Intel Xeon VM: 1% kept 3.5-3.7 / 5.2, 3% 4.0-4.1 / 5.0, 6% 4.6-4.8 / 4.9-5.2, 10% 5.2-5.35
//   / 5.2-5.3, 20% 6.0-6.8 / 5.35-5.6; on ResNet-18 at 10% kept the block loop's step was
//   0.79-0.80x the dense one against the set-bit loop's 0.84-0.89x: below 1/12 kept.
// - AMD EPYC Zen 3 VM (40 x 1M): compact / dense 0.67 / 0.68-0.75 at 5-10% kept, 0.66-0.69 /
//   0.80-0.84 at 15-20%, 0.74 / 0.89 at 30%, about equal at 50% (16.3 / 17.1 ms) and 24.4 /
//   14.2 ms at 80%: the block loop's permutes and blends cost more there, below 1/2 kept.
void masked_sgd_compact_f32_avx2(float* p, const float* grad, float* cbuf,
                                 const std::uint8_t* bits, std::int64_t begin, std::int64_t end,
                                 std::int64_t buf_begin, std::int64_t buf_numel,
                                 const SgdHyper& h) {
  with_flags(h, [&](auto m, auto n, auto f) {
    compact_avx2<12, decltype(m)::value, decltype(n)::value, decltype(f)::value>(
        p, grad, cbuf, bits, begin, end, buf_begin, buf_numel, h);
  });
}

void masked_sgd_compact_f32_avx2_setbits(float* p, const float* grad, float* cbuf,
                                         const std::uint8_t* bits, std::int64_t begin,
                                         std::int64_t end, std::int64_t buf_begin,
                                         std::int64_t buf_numel, const SgdHyper& h) {
  with_flags(h, [&](auto m, auto n, auto f) {
    compact_avx2<2, decltype(m)::value, decltype(n)::value, decltype(f)::value>(
        p, grad, cbuf, bits, begin, end, buf_begin, buf_numel, h);
  });
}

}  // namespace ong
