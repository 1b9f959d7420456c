// Shared description of one fused masked-SGD step, used by the CPU and CUDA kernels.
//
// The step is torch.optim.SGD applied to grad * mask, written so that pruned entries never
// read the gradient (a NaN there cannot leak) and are written as exact zeros:
//   g   = mask ? (maximize ? -grad : grad) : 0
//   g  += weight_decay * p
//   buf = first_step ? g : momentum * buf + (1 - dampening) * g      (when momentum != 0)
//   g   = nesterov ? g + momentum * buf : buf                         (when momentum != 0)
//   p   = mask ? p - lr * g : 0 ;  buf = mask ? buf : 0
#pragma once

#include <cstdint>

namespace ong {

struct SgdHyper {
  // double so float64 parameters see the exact hyper-parameters; float kernels round once.
  double lr;
  double momentum;
  double dampening;
  double weight_decay;
  bool nesterov;
  bool maximize;
  bool first_step;  // the momentum buffers are new: buf = g (no dampening), as torch.optim.SGD
};

// Element dtypes understood by the kernels (values match ong_kernels/backends/_native.py).
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// One tensor of the step. Pointers are raw device/host addresses (tensor.data_ptr()).
// buf == 0 when momentum == 0; mask == 0 for a dense parameter, else the address of the
// bit-packed mask (bit j of byte k = element 8k + j in memory order; ong_kernels/_bitmask.py).
struct SgdTensor {
  std::uintptr_t param;
  std::uintptr_t grad;
  std::uintptr_t buf;
  std::uintptr_t mask;
  std::int64_t numel;
};

}  // namespace ong
