// The scalar masked-SGD loop, included by each CPU unit that needs it (inside an anonymous
// namespace, so every unit keeps its own copy compiled for its own ISA).
#pragma once

#include <cstdint>

#include "ong_sgd.h"

namespace ong {
namespace {

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
  // maximize and GradScaler's unscale in one factor (grad_scale is a host address here)
  const T sign = static_cast<T>(grad_sign(h, h.grad_scale ? host_unscale(h) : 1.0f));
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

// update_scalar with the flags of `h` as template arguments.
template <typename T>
void update_scalar_dispatch(T* p, const T* grad, T* buf, const std::uint8_t* bits,
                            std::int64_t begin, std::int64_t end, const SgdHyper& h) {
  if (h.momentum == 0.0) return update_scalar<T, false, false, false>(p, grad, buf, bits, begin, end, h);
  if (h.nesterov) {
    if (h.first_step) return update_scalar<T, true, true, true>(p, grad, buf, bits, begin, end, h);
    return update_scalar<T, true, true, false>(p, grad, buf, bits, begin, end, h);
  }
  if (h.first_step) return update_scalar<T, true, false, true>(p, grad, buf, bits, begin, end, h);
  return update_scalar<T, true, false, false>(p, grad, buf, bits, begin, end, h);
}

}  // namespace
}  // namespace ong
