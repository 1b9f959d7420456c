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
#include <type_traits>

#include "ong_dtype.h"

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
  // torch.amp.GradScaler's fused path (0 = absent): addresses of one float32 each, in the
  // memory the kernel runs on. found_inf != 0 skips the step; the gradient is multiplied by
  // float(1 / double(grad_scale)), as GradScaler.unscale_ does, folded into `grad_sign`.
  std::uintptr_t grad_scale;
  std::uintptr_t found_inf;
};

// f(std::bool_constant<kMomentum>{}, std::bool_constant<kNesterov>{},
// std::bool_constant<kFirst>{}) for the runtime flags of `h`: the one place that maps them to a
// kernel template's arguments (nesterov and first_step matter only with momentum). A kernel
// reads them as decltype(m)::value.
template <typename F>
decltype(auto) with_flags(const SgdHyper& h, F&& f) {
  using Y = std::true_type;
  using N = std::false_type;
  if (h.momentum == 0.0) return f(N{}, N{}, N{});
  if (h.nesterov) return h.first_step ? f(Y{}, Y{}, Y{}) : f(Y{}, Y{}, N{});
  return h.first_step ? f(Y{}, N{}, Y{}) : f(Y{}, N{}, N{});
}

#ifdef __CUDACC__
#define ONG_HOST_DEVICE __host__ __device__
#else
#define ONG_HOST_DEVICE
#endif

// (maximize ? -1 : 1) times the unscale factor: the one factor a kept gradient is multiplied by.
ONG_HOST_DEVICE inline double grad_sign(const SgdHyper& h, float unscale) {
  return (h.maximize ? -1.0 : 1.0) * static_cast<double>(unscale);
}

// The unscale factor of a host-side grad_scale, computed as GradScaler does (float32 result).
inline float host_unscale(const SgdHyper& h) {
  if (h.grad_scale == 0) return 1.0f;
  return static_cast<float>(1.0 / static_cast<double>(*reinterpret_cast<const float*>(h.grad_scale)));
}

// One tensor of the step: one row of the int64 table that ong_kernels/backends/_multi_tensor.py
// builds (the same layout on the CPU and, in device memory, on CUDA). Pointers are raw
// addresses (tensor.data_ptr()); buf == 0 when momentum == 0; mask == 0 for a dense parameter,
// else the bit-packed mask (bit j of byte k = element 8k + j in memory order).
struct SgdTensor {
  std::int64_t param;
  std::int64_t grad;
  std::int64_t buf;
  std::int64_t mask;
  std::int64_t numel;
};
static_assert(sizeof(SgdTensor) == 5 * sizeof(std::int64_t), "SgdTensor is one table row");
constexpr int kSgdTableColumns = 5;

// compact_state: one row per masked tensor. `buf` holds the momentum of the kept elements
// only, in memory order; offsets[c] = kept elements before CPU chunk c (chunk =
// masked_sgd_chunk_size_cpu() elements), so each chunk knows where its momentum starts.
struct SgdCompactTensor {
  std::int64_t param;
  std::int64_t grad;
  std::int64_t buf;
  std::int64_t mask;
  std::int64_t numel;
  std::int64_t offsets;
  std::int64_t buf_numel;  // elements of buf: a kept element past it is skipped, never written
};
static_assert(sizeof(SgdCompactTensor) == 7 * sizeof(std::int64_t), "one table row");

// CPU: every tensor of one dtype in one OpenMP region. `table` is a host address.
void masked_sgd_step_cpu(const SgdTensor* table, std::int64_t n_tensors, DType dtype,
                         const SgdHyper& h, int num_threads);

// compact_state CPU step: every tensor of one dtype, only kept elements touched.
void masked_sgd_step_compact_cpu(const SgdCompactTensor* table, std::int64_t n_tensors,
                                 DType dtype, const SgdHyper& h, int num_threads);
std::int64_t masked_sgd_chunk_size_cpu();

// One tensor's float32 span [begin, end) per ISA unit: dense (buf: the momentum, or null) and
// compact (cbuf: the packed momentum from entry buf_begin, buf_numel entries in all).
using SpanF32 = void(float* p, const float* grad, float* buf, const std::uint8_t* bits,
                     std::int64_t begin, std::int64_t end, const SgdHyper& h);
using CompactSpanF32 = void(float* p, const float* grad, float* cbuf, const std::uint8_t* bits,
                            std::int64_t begin, std::int64_t end, std::int64_t buf_begin,
                            std::int64_t buf_numel, const SgdHyper& h);

// AVX-512 (csrc/cpu/masked_sgd_avx512.cpp); call only when active_isa() is kAvx512.
SpanF32 masked_sgd_span_f32_avx512;
CompactSpanF32 masked_sgd_compact_f32_avx512;
// The same step as the set-bit loop, compiled in the AVX-512 unit (bit for bit the vector
// span): the fallback the run-time measurement picks where compress/expand are slow.
CompactSpanF32 masked_sgd_compact_f32_avx512_setbits;

// AVX2 + FMA (csrc/cpu/masked_sgd_avx2.cpp); active_isa() >= kAvx2.
SpanF32 masked_sgd_span_f32_avx2;
CompactSpanF32 masked_sgd_compact_f32_avx2;
// The AVX2 compact span with the set-bit loop below half kept (the block loop only from 1/12
// kept in the "vector" one): bit for bit the same step, the faster one on AMD Zen 3.
CompactSpanF32 masked_sgd_compact_f32_avx2_setbits;

// Which compact span the active ISA runs: "vector" or "setbits", measured at first use per ISA
// (see csrc/cpu/masked_sgd.cpp; the portable unit has only "setbits");
// set_masked_sgd_compact_path_cpu overrides the active ISA's choice (tests, benchmarks).
const char* masked_sgd_compact_path_cpu();
void set_masked_sgd_compact_path_cpu(const char* name);

#ifdef ONG_WITH_CUDA
// CUDA: ONE launch for every tensor of one dtype. `table` is a device address holding the
// n_tensors rows followed by n_tensors + 1 prefix sums of chunk counts.
void masked_sgd_step_cuda(std::uintptr_t table, int n_tensors, std::int64_t n_chunks, DType dtype,
                          const SgdHyper& h, int device, std::uintptr_t stream);
int masked_sgd_chunk_size_cuda();
#endif

}  // namespace ong
