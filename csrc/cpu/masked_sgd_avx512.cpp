// The AVX-512 float32 masked-SGD span (compiled with -mavx512f -mavx512bw -mavx512vl -mfma;
// called only after runtime detection, see ong_isa.h).
//
// 16 mask bits are one __mmask16, and a zero-masked load reads the gradient only where the
// weight is kept, so a NaN/Inf gradient at a pruned position is never even loaded.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "masked_sgd_scalar.h"
#include "ong_sgd.h"

namespace ong {
namespace {

struct Set16 {
  __m512 operator()(float x) const { return _mm512_set1_ps(x); }
};

// The hyper-parameters broadcast to 16 lanes, shared by the dense and the compact span.
using Lanes = Hyper<float, __m512, Set16>;

template <bool kMomentum, bool kNesterov, bool kFirst>
void update_avx512(float* __restrict p, const float* __restrict grad, float* __restrict buf,
                   const std::uint8_t* __restrict bits, std::int64_t begin, std::int64_t end,
                   const SgdHyper& h) {
  const Lanes v(h);
  std::int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    if ((i & 63) == 0) {  // masked_sgd_scalar.h: why, and the measurement
      prefetch_ahead(p + i, grad + i);
      if constexpr (kMomentum) prefetch_ahead(buf + i);
    }
    __mmask16 keep = 0xFFFF;
    if (bits != nullptr) std::memcpy(&keep, bits + (i >> 3), sizeof(keep));
    __m512 g = _mm512_mul_ps(v.sign, _mm512_maskz_loadu_ps(keep, grad + i));
    const __m512 w = _mm512_loadu_ps(p + i);
    if (v.use_wd) g = _mm512_fmadd_ps(v.wd, w, g);
    if constexpr (kMomentum) {
      __m512 b = kFirst ? g : _mm512_fmadd_ps(v.mom, _mm512_loadu_ps(buf + i), _mm512_mul_ps(v.damp, g));
      b = _mm512_maskz_mov_ps(keep, b);
      _mm512_storeu_ps(buf + i, b);
      g = kNesterov ? _mm512_fmadd_ps(v.mom, b, g) : b;
    }
    _mm512_storeu_ps(p + i, _mm512_maskz_mov_ps(keep, _mm512_fnmadd_ps(v.lr, g, w)));
  }
  update_scalar<float, kMomentum, kNesterov, kFirst>(p, grad, buf, bits, i, end, h);
}

// compact_state, 16 weights at a time: p and the gradient are loaded at kept lanes only,
// the compact momentum of the n kept weights is loaded packed (first n lanes) and expanded
// into the kept lanes in a register, and compressed in a register before a masked store; a
// group of 16 pruned weights is skipped (18.5% of the groups at 90% random sparsity). Same
// operations as update_avx512, so the trajectory is dense mode's bit for bit.
//
// Why register forms: vexpandps / vcompressps with a memory operand are microcoded on AMD
// Zen 4; issue 17 measured this step (then written with _mm512_mask_compressstoreu_ps and
// _mm512_maskz_expandloadu_ps) 2.4x slower than the dense step there at 10% kept, while the
// register forms are single fast instructions on Zen 4 and on Intel. Only the Intel side
// could be measured for this change (benchmarks/RESULTS.md, issue 17); the AMD one is the
// documented instruction cost, not a measurement.
template <bool kMomentum, bool kNesterov, bool kFirst>
void compact_avx512(float* __restrict p, const float* __restrict grad, float* __restrict cbuf,
                    const std::uint8_t* __restrict bits, std::int64_t begin, std::int64_t end,
                    std::int64_t buf_begin, std::int64_t buf_numel, const SgdHyper& h) {
  const Lanes v(h);
  std::int64_t k = buf_begin;
  std::int64_t i = begin;
  // 64 weights (4 groups) per block: the block's 4 packed momentum loads are issued before
  // its stores. Group by group, each load read the line the previous group's masked store
  // had just written and waited for it (no store-to-load forwarding for a masked store):
  // timed in cache at 50% kept, the set-bit loop then beat this span.
  for (; i + 64 <= end; i += 64) {
    CompactBlock<4> blk;
    if (!read_block(bits, p, grad, i, k, blk)) continue;
    if constexpr (kMomentum) {
      // bits and offsets that disagree with the buffer cannot make us touch memory past it
      if (k < 0 || blk.next > buf_numel) return;
    }
    __m512 b[4], w_new[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const float* gj = grad + i + 16 * j;
      __m512 g = _mm512_mul_ps(v.sign, _mm512_maskz_loadu_ps(blk.group[j], gj));
      const __m512 w = _mm512_maskz_loadu_ps(blk.group[j], p + i + 16 * j);
      if (v.use_wd) g = _mm512_fmadd_ps(v.wd, w, g);
      if constexpr (kMomentum) {
        b[j] = g;
        if constexpr (!kFirst) {
          const __mmask16 first = static_cast<__mmask16>((1u << blk.n[j]) - 1u);
          const __m512 packed = _mm512_maskz_loadu_ps(first, cbuf + blk.at[j]);
          b[j] = _mm512_fmadd_ps(v.mom, _mm512_maskz_expand_ps(blk.group[j], packed),
                                 _mm512_mul_ps(v.damp, g));
        }
        g = kNesterov ? _mm512_fmadd_ps(v.mom, b[j], g) : b[j];
      }
      w_new[j] = _mm512_fnmadd_ps(v.lr, g, w);
    }
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      if constexpr (kMomentum) {
        const __mmask16 first = static_cast<__mmask16>((1u << blk.n[j]) - 1u);
        const __m512 front = _mm512_maskz_compress_ps(blk.group[j], b[j]);
        _mm512_mask_storeu_ps(cbuf + blk.at[j], first, front);
      }
      _mm512_mask_storeu_ps(p + i + 16 * j, blk.group[j], w_new[j]);
    }
    k = blk.next;
  }
  for (; i + 16 <= end; i += 16) {
    __mmask16 keep = 0;
    std::memcpy(&keep, bits + (i >> 3), sizeof(keep));
    if (keep == 0) continue;
    const int n = __builtin_popcount(static_cast<unsigned>(keep));
    if constexpr (kMomentum) {
      // bits and offsets that disagree with the buffer cannot make us touch memory past it
      if (k < 0 || k + n > buf_numel) return;
    }
    __m512 g = _mm512_mul_ps(v.sign, _mm512_maskz_loadu_ps(keep, grad + i));
    const __m512 w = _mm512_maskz_loadu_ps(keep, p + i);
    if (v.use_wd) g = _mm512_fmadd_ps(v.wd, w, g);
    if constexpr (kMomentum) {
      const __mmask16 first = static_cast<__mmask16>((1u << n) - 1u);
      __m512 b = g;
      if constexpr (!kFirst) {
        const __m512 packed = _mm512_maskz_loadu_ps(first, cbuf + k);
        b = _mm512_fmadd_ps(v.mom, _mm512_maskz_expand_ps(keep, packed), _mm512_mul_ps(v.damp, g));
      }
      _mm512_mask_storeu_ps(cbuf + k, first, _mm512_maskz_compress_ps(keep, b));
      g = kNesterov ? _mm512_fmadd_ps(v.mom, b, g) : b;
    }
    _mm512_mask_storeu_ps(p + i, keep, _mm512_fnmadd_ps(v.lr, g, w));
    k += n;
  }
  update_compact<float, kMomentum, kNesterov, kFirst>(p, grad, cbuf, bits, i, end, k, buf_numel,
                                                      h);
}

}  // namespace

void masked_sgd_compact_f32_avx512(float* p, const float* grad, float* cbuf,
                                   const std::uint8_t* bits, std::int64_t begin, std::int64_t end,
                                   std::int64_t buf_begin, std::int64_t buf_numel,
                                   const SgdHyper& h) {
  with_flags(h, [&](auto m, auto n, auto f) {
    compact_avx512<decltype(m)::value, decltype(n)::value, decltype(f)::value>(
        p, grad, cbuf, bits, begin, end, buf_begin, buf_numel, h);
  });
}

void masked_sgd_compact_f32_avx512_setbits(float* p, const float* grad, float* cbuf,
                                           const std::uint8_t* bits, std::int64_t begin,
                                           std::int64_t end, std::int64_t buf_begin,
                                           std::int64_t buf_numel, const SgdHyper& h) {
  // the set-bit loop compiled in this unit (madd = FMA): the vector span's arithmetic
  update_compact_dispatch<float>(p, grad, cbuf, bits, begin, end, buf_begin, buf_numel, h);
}

void masked_sgd_span_f32_avx512(float* p, const float* grad, float* buf,
                                const std::uint8_t* bits, std::int64_t begin, std::int64_t end,
                                const SgdHyper& h) {
  with_flags(h, [&](auto m, auto n, auto f) {
    update_avx512<decltype(m)::value, decltype(n)::value, decltype(f)::value>(p, grad, buf, bits,
                                                                              begin, end, h);
  });
}

}  // namespace ong
