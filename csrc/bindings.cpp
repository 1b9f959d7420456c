// pybind11 module ong_kernels._C: the compiled kernels, called with raw tensor addresses.
//
// The extension does not link libtorch: Python passes tensor.data_ptr() values, sizes and
// dtype codes, and the kernels work on plain memory. That keeps the build to seconds, frees it
// from torch's C++ ABI (one build works with any torch version), and mirrors bitsandbytes'
// native library. Validation happens in Python (ong_kernels/backends/) before any call here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "ong_sgd.h"

namespace py = pybind11;

namespace ong {
void masked_sgd_step_cpu(const std::vector<SgdTensor>& tensors, DType dtype, const SgdHyper& h,
                         int num_threads);
#ifdef ONG_WITH_CUDA
void masked_sgd_step_cuda(std::uintptr_t table, int n_tensors, std::int64_t n_chunks, DType dtype,
                          const SgdHyper& h, int device, std::uintptr_t stream);
int masked_sgd_chunk_size_cuda();
#endif
}  // namespace ong

namespace {

std::vector<ong::SgdTensor> gather_tensors(const std::vector<std::uintptr_t>& params,
                                           const std::vector<std::uintptr_t>& grads,
                                           const std::vector<std::uintptr_t>& bufs,
                                           const std::vector<std::uintptr_t>& masks,
                                           const std::vector<std::int64_t>& numels) {
  const std::size_t n = params.size();
  if (grads.size() != n || bufs.size() != n || masks.size() != n || numels.size() != n) {
    throw std::invalid_argument("masked_sgd_step_cpu: address lists differ in length");
  }
  std::vector<ong::SgdTensor> out(n);
  for (std::size_t i = 0; i < n; ++i) out[i] = {params[i], grads[i], bufs[i], masks[i], numels[i]};
  return out;
}

ong::SgdHyper make_hyper(double lr, double momentum, double dampening, double weight_decay,
                         bool nesterov, bool maximize, bool first_step) {
  return {lr, momentum, dampening, weight_decay, nesterov, maximize, first_step};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ong_kernels compiled kernels (CPU always; CUDA when built with it)";

  m.def(
      "masked_sgd_step_cpu",
      [](const std::vector<std::uintptr_t>& params, const std::vector<std::uintptr_t>& grads,
         const std::vector<std::uintptr_t>& bufs, const std::vector<std::uintptr_t>& masks,
         const std::vector<std::int64_t>& numels, int dtype, double lr, double momentum,
         double dampening, double weight_decay, bool nesterov, bool maximize, bool first_step,
         int num_threads) {
        const auto tensors = gather_tensors(params, grads, bufs, masks, numels);
        const auto h = make_hyper(lr, momentum, dampening, weight_decay, nesterov, maximize,
                                  first_step);
        py::gil_scoped_release release;
        ong::masked_sgd_step_cpu(tensors, static_cast<ong::DType>(dtype), h, num_threads);
      },
      py::arg("params"), py::arg("grads"), py::arg("bufs"), py::arg("masks"), py::arg("numels"),
      py::arg("dtype"), py::arg("lr"), py::arg("momentum"), py::arg("dampening"),
      py::arg("weight_decay"), py::arg("nesterov"), py::arg("maximize"), py::arg("first_step"),
      py::arg("num_threads"),
      R"pbdoc(
        One fused masked SGD step over contiguous CPU tensors of one dtype (0=float32, 1=float64).

        Each list holds one address per tensor (bufs: 0 when momentum == 0; masks: 0 for a
        dense tensor, else its bit-packed mask, see ong_kernels/_bitmask.py). Runs with the
        GIL released.
      )pbdoc");

#ifdef ONG_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("masked_sgd_chunk_size_cuda", &ong::masked_sgd_chunk_size_cuda,
        "Elements per thread block of the CUDA masked SGD kernel (the table's chunk unit).");
  m.def(
      "masked_sgd_step_cuda",
      [](std::uintptr_t table, int n_tensors, std::int64_t n_chunks, int dtype, double lr,
         double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
         bool first_step, int device, std::uintptr_t stream) {
        const auto h = make_hyper(lr, momentum, dampening, weight_decay, nesterov, maximize,
                                  first_step);
        py::gil_scoped_release release;
        ong::masked_sgd_step_cuda(table, n_tensors, n_chunks, static_cast<ong::DType>(dtype), h,
                                  device, stream);
      },
      py::arg("table"), py::arg("n_tensors"), py::arg("n_chunks"), py::arg("dtype"), py::arg("lr"),
      py::arg("momentum"), py::arg("dampening"), py::arg("weight_decay"), py::arg("nesterov"),
      py::arg("maximize"), py::arg("first_step"), py::arg("device"), py::arg("stream"),
      R"pbdoc(
        One fused masked SGD step for every tensor of a group in ONE kernel launch on `stream`.

        table: device address of an int64 table [n_tensors x (param, grad, buf, mask, numel)]
        followed by the n_tensors + 1 prefix sums of chunk counts (chunk: masked_sgd_chunk_size_cuda()).
        dtype: 0=float32, 1=float64, 2=float16, 3=bfloat16.
      )pbdoc");
#else
  m.attr("with_cuda") = false;
#endif
}
