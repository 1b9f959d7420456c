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

#include <cstdint>

#include "masked_sgd_scalar.h"
#include "ong_sgd.h"

namespace ong {
namespace {

inline __m256 lane_mask(unsigned byte) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i b = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(byte)), bit);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(b, bit));
}

template <bool kMomentum, bool kNesterov, bool kFirst>
void update_avx2(float* __restrict p, const float* __restrict grad, float* __restrict buf,
                 const std::uint8_t* __restrict bits, std::int64_t begin, std::int64_t end,
                 const SgdHyper& h) {
  const __m256 lr = _mm256_set1_ps(static_cast<float>(h.lr));
  const __m256 wd = _mm256_set1_ps(static_cast<float>(h.weight_decay));
  const __m256 mom = _mm256_set1_ps(static_cast<float>(h.momentum));
  const __m256 damp = _mm256_set1_ps(static_cast<float>(1.0 - h.dampening));
  const __m256 sign =
      _mm256_set1_ps(static_cast<float>(grad_sign(h, h.grad_scale ? host_unscale(h) : 1.0f)));
  const bool use_wd = h.weight_decay != 0.0;
  const __m256 all = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  std::int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    const __m256 keep = bits != nullptr ? lane_mask(bits[i >> 3]) : all;
    __m256 g = _mm256_and_ps(keep, _mm256_mul_ps(sign, _mm256_loadu_ps(grad + i)));
    const __m256 w = _mm256_loadu_ps(p + i);
    if (use_wd) g = _mm256_fmadd_ps(wd, w, g);
    if constexpr (kMomentum) {
      __m256 b = kFirst ? g : _mm256_fmadd_ps(mom, _mm256_loadu_ps(buf + i), _mm256_mul_ps(damp, g));
      b = _mm256_and_ps(keep, b);
      _mm256_storeu_ps(buf + i, b);
      g = kNesterov ? _mm256_fmadd_ps(mom, b, g) : b;
    }
    _mm256_storeu_ps(p + i, _mm256_and_ps(keep, _mm256_fnmadd_ps(lr, g, w)));
  }
  update_scalar<float, kMomentum, kNesterov, kFirst>(p, grad, buf, bits, i, end, h);
}

}  // namespace

void masked_sgd_span_f32_avx2(float* p, const float* grad, float* buf, const std::uint8_t* bits,
                              std::int64_t begin, std::int64_t end, const SgdHyper& h) {
  if (h.momentum == 0.0) return update_avx2<false, false, false>(p, grad, buf, bits, begin, end, h);
  if (h.nesterov) {
    if (h.first_step) return update_avx2<true, true, true>(p, grad, buf, bits, begin, end, h);
    return update_avx2<true, true, false>(p, grad, buf, bits, begin, end, h);
  }
  if (h.first_step) return update_avx2<true, false, true>(p, grad, buf, bits, begin, end, h);
  return update_avx2<true, false, false>(p, grad, buf, bits, begin, end, h);
}

void masked_sgd_compact_f32_avx2(float* p, const float* grad, float* cbuf,
                                 const std::uint8_t* bits, std::int64_t begin, std::int64_t end,
                                 std::int64_t buf_begin, std::int64_t buf_numel,
                                 const SgdHyper& h) {
  // The scalar loop over set bits (masked_sgd_scalar.h), compiled here for this unit's FMA.
  // Measured against two vector forms (20 x 1M float32, 10% kept, Intel, loaded machine;
  // dense AVX2 span 26.9 ms): vmaskmovps loads/stores of p, grad and the momentum 36 ms; full
  // loads/stores with a per-byte permutation of the momentum (its write-back of the next
  // bytes' values makes every load wait for the previous store) 27.7 ms; this loop 0.87-0.92x
  // the dense span (portable build of the same loop: 24.7 vs 30.9 ms). AVX2 has no
  // compress/expand, so the loop that touches only kept elements wins at 90% sparsity.
  update_compact_dispatch<float>(p, grad, cbuf, bits, begin, end, buf_begin, buf_numel, h);
}

}  // namespace ong
