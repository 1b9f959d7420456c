// Fused masked SGD step on CUDA: ONE launch updates every tensor of a parameter group.
//
// Multi-tensor layout (the apex idea, with the table in device memory instead of kernel
// arguments so any number of tensors fits one launch): the host writes one int64 table
//   [n_tensors x 5]   param, grad, buf, mask addresses and numel per tensor
//   [n_tensors + 1]   prefix sum of chunk counts (chunk = kChunk elements)
// Each thread block owns one chunk; it finds its tensor by binary search over the prefix sum
// (a few hundred tensors at most: ~8 steps from L1/L2), then updates the chunk with the same
// select-based arithmetic as the CPU kernel (see csrc/include/ong_sgd.h).
#include "ong_sgd.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace ong {
namespace {

constexpr int kThreads = 256;
constexpr int kChunk = 8192;  // elements per block: 32 per thread, amortises the table lookup

// Arithmetic in float for float/half/bf16 (as torch's fused SGD), in double for double.
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T, typename A> __device__ __forceinline__ T from_acc(A v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half, float>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ int find_tensor(const std::int64_t* prefix, int n_tensors, int chunk) {
  int lo = 0, hi = n_tensors;  // invariant: prefix[lo] <= chunk < prefix[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (prefix[mid] <= chunk) lo = mid; else hi = mid;
  }
  return lo;
}

// One element's update in the accumulation type: the select-based step of ong_sgd.h.
// `w` and `b` are only meaningful where `keep` (the callers skip their loads elsewhere).
template <typename A>
struct Step {
  A lr, wd, mom, damp, sign;
  bool use_buf, first, nesterov;
  __device__ __forceinline__ void operator()(bool keep, A graw, A& w, A& b) const {
    A g = keep ? sign * graw : A(0);  // select, never multiply: NaN at pruned stays out
    w = keep ? w : A(0);
    if (wd != A(0)) g += wd * w;
    if (use_buf) {
      b = keep ? (first ? g : mom * b + damp * g) : A(0);
      g = nesterov ? g + mom * b : b;
    }
    w = keep ? w - lr * g : A(0);
  }
};

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

// 4 consecutive elements with vector loads/stores; p and buf are not read when all four are
// pruned (at 90% random sparsity 66% of the groups), the gradient load never waits on the
// mask load (it is unconditional; the select drops what it brought at pruned positions).
template <typename T, typename A>
__device__ __forceinline__ void update4(T* p, const T* grad, T* buf, unsigned nibble,
                                        const Step<A>& st) {
  const Vec4<T> gv = *reinterpret_cast<const Vec4<T>*>(grad);
  Vec4<T> pv, bv;
  if (nibble != 0) {
    pv = *reinterpret_cast<const Vec4<T>*>(p);
    if (st.use_buf && !st.first) bv = *reinterpret_cast<const Vec4<T>*>(buf);
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const bool keep = (nibble >> j) & 1;
    A w = nibble ? to_acc(pv.v[j]) : A(0);
    A b = (nibble && st.use_buf && !st.first) ? to_acc(bv.v[j]) : A(0);
    st(keep, to_acc(gv.v[j]), w, b);
    pv.v[j] = from_acc<T>(w);
    bv.v[j] = from_acc<T>(b);
  }
  *reinterpret_cast<Vec4<T>*>(p) = pv;
  if (st.use_buf) *reinterpret_cast<Vec4<T>*>(buf) = bv;
}

// At least two blocks per SM. ptxas (CUDA 13.0, pip install -v): 59/78/53/53 registers for
// float/double/half/bf16 at sm_80, 0 bytes of spills (issue 10 reported 16 B spills for
// double with the previous kernel).
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
masked_sgd_kernel(const std::int64_t* __restrict__ table, int n_tensors, SgdHyper h) {
  using A = typename Acc<T>::type;
  // GradScaler: an inf anywhere skips the step without a host sync.
  if (h.found_inf != 0 && *reinterpret_cast<const float*>(h.found_inf) != 0.0f) return;
  const float unscale =
      h.grad_scale != 0
          ? static_cast<float>(1.0 / static_cast<double>(*reinterpret_cast<const float*>(h.grad_scale)))
          : 1.0f;
  const std::int64_t* prefix = table + kSgdTableColumns * n_tensors;
  const int chunk = blockIdx.x;
  const int t = find_tensor(prefix, n_tensors, chunk);
  const std::int64_t* row = table + kSgdTableColumns * t;
  T* __restrict__ p = reinterpret_cast<T*>(row[0]);  // row = one SgdTensor
  const T* __restrict__ grad = reinterpret_cast<const T*>(row[1]);
  T* __restrict__ buf = reinterpret_cast<T*>(row[2]);
  const std::uint8_t* __restrict__ bits = reinterpret_cast<const std::uint8_t*>(row[3]);
  const std::int64_t numel = row[4];
  const std::int64_t begin = static_cast<std::int64_t>(chunk - prefix[t]) * kChunk;
  const std::int64_t end = begin + kChunk < numel ? begin + kChunk : numel;

  Step<A> st;
  st.lr = A(h.lr);
  st.wd = A(h.weight_decay);
  st.mom = A(h.momentum);
  st.damp = A(1.0 - h.dampening);
  st.sign = A(grad_sign(h, unscale));
  st.use_buf = buf != nullptr;
  st.first = h.first_step;
  st.nesterov = h.nesterov;

  // Vector path: all three arrays 16-byte aligned (begin is a multiple of kChunk, so of 4).
  constexpr std::uintptr_t kAlign = 4 * sizeof(T);
  const bool aligned = (reinterpret_cast<std::uintptr_t>(p) % kAlign == 0) &&
                       (reinterpret_cast<std::uintptr_t>(grad) % kAlign == 0) &&
                       (reinterpret_cast<std::uintptr_t>(buf) % kAlign == 0);
  std::int64_t i = begin;
  if (aligned) {
    const std::int64_t vec_end = begin + ((end - begin) & ~std::int64_t(3));
    for (std::int64_t v = begin + 4 * threadIdx.x; v < vec_end; v += 4 * kThreads) {
      // 4 elements starting at a multiple of 4: one nibble of one mask byte.
      const unsigned nibble = bits == nullptr ? 0xFu : (bits[v >> 3] >> (v & 4)) & 0xFu;
      update4<T, A>(p + v, grad + v, buf != nullptr ? buf + v : nullptr, nibble, st);
    }
    i = vec_end;
  }
  for (i += threadIdx.x; i < end; i += kThreads) {
    const bool keep = bits == nullptr || ((bits[i >> 3] >> (i & 7)) & 1);
    const A graw = to_acc(grad[i]);
    A w = keep ? to_acc(p[i]) : A(0);
    A b = (keep && st.use_buf && !st.first) ? to_acc(buf[i]) : A(0);
    st(keep, graw, w, b);
    p[i] = from_acc<T>(w);
    if (st.use_buf) buf[i] = from_acc<T>(b);
  }
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("masked_sgd_step_cuda: ") + what + ": " +
                             cudaGetErrorString(err));
  }
}

}  // namespace

int masked_sgd_chunk_size_cuda() { return kChunk; }

// table: device address of the int64 table described above; n_chunks = prefix[n_tensors].
void masked_sgd_step_cuda(std::uintptr_t table, int n_tensors, std::int64_t n_chunks, DType dtype,
                          const SgdHyper& h, int device, std::uintptr_t stream) {
  switch (dtype) {  // an unknown code is refused before anything is touched
    case DType::kFloat32: case DType::kFloat64: case DType::kFloat16: case DType::kBFloat16: break;
    default: unsupported_dtype("masked_sgd_step_cuda", dtype);
  }
  if (n_chunks == 0) return;
  if (n_chunks > 0x7fffffffLL) throw std::invalid_argument("masked_sgd_step_cuda: too many chunks");
  // Launch on the tensors' device and give the caller's current device back (as torch's
  // CUDAGuard does), so torch's idea of the current device never changes under it.
  int previous = 0;
  check(cudaGetDevice(&previous), "cudaGetDevice");
  if (previous != device) check(cudaSetDevice(device), "cudaSetDevice");
  const auto* tbl = reinterpret_cast<const std::int64_t*>(table);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>(n_chunks));
  switch (dtype) {
    case DType::kFloat32: masked_sgd_kernel<float><<<grid, kThreads, 0, s>>>(tbl, n_tensors, h); break;
    case DType::kFloat64: masked_sgd_kernel<double><<<grid, kThreads, 0, s>>>(tbl, n_tensors, h); break;
    case DType::kFloat16: masked_sgd_kernel<__half><<<grid, kThreads, 0, s>>>(tbl, n_tensors, h); break;
    case DType::kBFloat16:
      masked_sgd_kernel<__nv_bfloat16><<<grid, kThreads, 0, s>>>(tbl, n_tensors, h);
      break;
  }  // no default: the codes were checked above
  const cudaError_t launch = cudaGetLastError();
  if (previous != device) check(cudaSetDevice(previous), "cudaSetDevice");
  check(launch, "kernel launch");
}


}  // namespace ong
