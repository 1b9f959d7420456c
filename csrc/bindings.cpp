// pybind11 module ong_kernels._C: the compiled kernels, called with raw tensor addresses.
//
// The extension does not link libtorch: Python passes tensor.data_ptr() values, sizes and
// dtype codes, and the kernels work on plain memory. That keeps the build to seconds, frees it
// from torch's C++ ABI (one build works with any torch version), and mirrors bitsandbytes'
// native library. Validation happens in Python (ong_kernels/backends/) before any call here.
// Each kernel file registers its bindings through a `bind_*` function declared below, so
// adding a kernel touches this file in one line.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>

#include "ong_dtype.h"
#include "ong_isa.h"
#include "ong_nmf.h"
#include "ong_nmf_beta.h"
#include "ong_sgd.h"

namespace py = pybind11;

namespace {

// ong_kernels.backends._sgd_args.SgdHyper (any object with these fields), read by name: the
// Python type mirrors struct SgdHyper field for field, so no call site orders them by hand.
ong::SgdHyper hyper_from(py::handle h, std::uintptr_t grad_scale, std::uintptr_t found_inf) {
  return {h.attr("lr").cast<double>(),
          h.attr("momentum").cast<double>(),
          h.attr("dampening").cast<double>(),
          h.attr("weight_decay").cast<double>(),
          h.attr("nesterov").cast<bool>(),
          h.attr("maximize").cast<bool>(),
          h.attr("first_step").cast<bool>(),
          grad_scale,
          found_inf};
}

void bind_common(py::module_& m) {
  py::enum_<ong::DType> dtype(m, "DType", "Element dtypes of the native kernels (csrc/include/ong_dtype.h)");
#define ONG_DTYPE_VALUE(e, code, name) dtype.value(name, ong::DType::e);
  ONG_DTYPES(ONG_DTYPE_VALUE)
#undef ONG_DTYPE_VALUE

  py::enum_<ong::Isa>(m, "Isa", "CPU instruction sets the kernels dispatch on at run time")
      .value("portable", ong::Isa::kPortable)
      .value("avx2", ong::Isa::kAvx2)
      .value("avx512", ong::Isa::kAvx512);
  m.def("best_isa", &ong::best_isa, "The best ISA this CPU and build support.");
  m.def("active_isa", &ong::active_isa, "The ISA the CPU kernels use now.");
  m.def("set_isa", &ong::set_isa, py::arg("isa"),
        "Lower (or restore) the ISA the CPU kernels use (tests and benchmarks); "
        "raises ValueError above best_isa().");
}

// A CPU step over a host table of Row (dense or compact), with the GIL released.
template <typename Row, void (*Step)(const Row*, std::int64_t, ong::DType, const ong::SgdHyper&,
                                     int)>
void def_cpu_step(py::module_& m, const char* name, const char* doc) {
  m.def(
      name,
      [](std::uintptr_t table, std::int64_t n_tensors, ong::DType dtype, py::handle hyper,
         int num_threads, std::uintptr_t grad_scale, std::uintptr_t found_inf) {
        const auto h = hyper_from(hyper, grad_scale, found_inf);
        py::gil_scoped_release release;
        Step(reinterpret_cast<const Row*>(table), n_tensors, dtype, h, num_threads);
      },
      py::arg("table"), py::arg("n_tensors"), py::arg("dtype"), py::arg("hyper"),
      py::arg("num_threads"), py::arg("grad_scale") = 0, py::arg("found_inf") = 0, doc);
}

void bind_masked_sgd(py::module_& m) {
  def_cpu_step<ong::SgdTensor, ong::masked_sgd_step_cpu>(m, "masked_sgd_step_cpu", R"pbdoc(
        One fused masked SGD step over dense CPU tensors of one dtype (float32 or float64).

        hyper: an object with the fields of csrc/include/ong_sgd.h SgdHyper (lr, momentum,
        dampening, weight_decay, nesterov, maximize, first_step), read by name.

        table: host address of an int64 table [n_tensors x (param, grad, buf, mask, numel)]
        (buf: 0 when momentum == 0; mask: 0 for a dense tensor, else its bit-packed mask, see
        ong_kernels/_bitmask.py). grad_scale / found_inf: host addresses of GradScaler's float32
        scale and inf flag (0: none); a nonzero flag skips the step. Runs with the GIL released.
      )pbdoc");

  m.def("masked_sgd_compact_path_cpu", &ong::masked_sgd_compact_path_cpu,
        "Which compact_state span the active ISA runs: 'vector' (AVX-512 expand/compress; "
        "AVX2 blocks from 1/12 kept) or 'setbits' (the set-bit loop; AVX2: up to 1/2 kept), "
        "chosen per ISA by timing both at first use.");
  m.def("set_masked_sgd_compact_path_cpu", &ong::set_masked_sgd_compact_path_cpu,
        py::arg("name"),
        "Override the active ISA's choice (tests, benchmarks): 'vector' or 'setbits'.");
  m.def("masked_sgd_chunk_size_cpu", &ong::masked_sgd_chunk_size_cpu,
        "Elements per chunk of the CPU kernels (the unit of the compact offsets table).");
  def_cpu_step<ong::SgdCompactTensor, ong::masked_sgd_step_compact_cpu>(
      m, "masked_sgd_step_compact_cpu", R"pbdoc(
        compact_state step: table rows (param, grad, compact buf, mask, numel, offsets), see
        csrc/include/ong_sgd.h SgdCompactTensor. Only kept elements are read or written.
      )pbdoc");

#ifdef ONG_WITH_CUDA
  m.def("masked_sgd_chunk_size_cuda", &ong::masked_sgd_chunk_size_cuda,
        "Elements per thread block of the CUDA masked SGD kernel (the table's chunk unit).");
  m.def(
      "masked_sgd_step_cuda",
      [](std::uintptr_t table, int n_tensors, std::int64_t n_chunks, ong::DType dtype,
         py::handle hyper, int device, std::uintptr_t stream, std::uintptr_t grad_scale,
         std::uintptr_t found_inf) {
        const auto h = hyper_from(hyper, grad_scale, found_inf);
        py::gil_scoped_release release;
        ong::masked_sgd_step_cuda(table, n_tensors, n_chunks, dtype, h, device, stream);
      },
      py::arg("table"), py::arg("n_tensors"), py::arg("n_chunks"), py::arg("dtype"),
      py::arg("hyper"), py::arg("device"), py::arg("stream"),
      py::arg("grad_scale") = 0, py::arg("found_inf") = 0,
      R"pbdoc(
        One fused masked SGD step for every tensor of a group in ONE kernel launch on `stream`.

        table: device address of the same int64 rows as the CPU kernel's, followed by the
        n_tensors + 1 prefix sums of chunk counts (chunk: masked_sgd_chunk_size_cuda()).
        grad_scale / found_inf: device addresses of GradScaler's float32 scale and inf flag
        (0: none), read by the kernel: a skipped step costs no host sync.
      )pbdoc");
#endif
}

void bind_nmf_mu(py::module_& m) {
  m.def(
      "nmf_mu_cpu",
      [](std::uintptr_t table, std::uintptr_t dtypes, std::int64_t n_matrices,
         std::int64_t max_iter, double tol, std::uintptr_t n_iter, int num_threads) {
        py::gil_scoped_release release;
        ong::nmf_mu_cpu(reinterpret_cast<const ong::NmfMatrix*>(table),
                        reinterpret_cast<const std::int64_t*>(dtypes), n_matrices, max_iter, tol,
                        reinterpret_cast<std::int64_t*>(n_iter), num_threads);
      },
      py::arg("table"), py::arg("dtypes"), py::arg("n_matrices"), py::arg("max_iter"),
      py::arg("tol"), py::arg("n_iter"), py::arg("num_threads"),
      R"pbdoc(
        Multiplicative-update NMF of a whole ragged batch in ONE call (GIL released).

        table: host address of the int64 table of ong_kernels.nmf_plan.matrix_table
        [n_matrices x (V, W, H addresses, m, n, r)]; dtypes: int64 DType code of each V;
        n_iter: int64 output, iterations run per matrix. W (m x r) and H (r x n) float32 are
        updated in place; stopping as nmf_plan.stop_rule, checked every 10 iterations (none
        when tol == 0). Raises ValueError on a malformed table before touching anything.
      )pbdoc");
}

void bind_sketch_product(py::module_& m) {
  m.def(
      "sketch_product_cpu",
      [](std::uintptr_t v, std::int64_t m_rows, std::int64_t n, std::uintptr_t x, std::int64_t wp,
         std::uintptr_t out, bool transpose, int num_threads) {
        py::gil_scoped_release release;
        ong::sketch_product_cpu(reinterpret_cast<const float*>(v), m_rows, n,
                                reinterpret_cast<const float*>(x), wp,
                                reinterpret_cast<float*>(out), transpose, num_threads);
      },
      py::arg("v"), py::arg("m"), py::arg("n"), py::arg("x"), py::arg("wp"), py::arg("out"),
      py::arg("transpose"), py::arg("num_threads"),
      R"pbdoc(
        out = V X (transpose False; X n x wp, out m x wp) or V^T X (transpose True; X m x wp,
        out n x wp), float32 row-major host addresses, wp a multiple of 16 (GIL released):
        the randomized SVD's sketch products with the MU kernels' register tiles. The caller
        guarantees the buffers' sizes (ong_kernels.backends.cpu_nmf.sketch_product checks
        them); raises ValueError on sizes out of range or a null address.
      )pbdoc");
}

void bind_nmf_beta(py::module_& m) {
  m.def(
      "nmf_beta_cpu",
      [](std::uintptr_t table, std::int64_t n_matrices, std::int64_t max_iter, double tol,
         double beta, double alpha_w, double alpha_h, double l1_ratio, bool update_h,
         std::uintptr_t n_iter, int num_threads) {
        py::gil_scoped_release release;
        const ong::NmfBetaLoss loss{beta, alpha_w, alpha_h, l1_ratio, update_h};
        ong::nmf_beta_cpu(reinterpret_cast<const ong::NmfMatrix*>(table), n_matrices, max_iter,
                          tol, loss, reinterpret_cast<std::int64_t*>(n_iter), num_threads);
      },
      py::arg("table"), py::arg("n_matrices"), py::arg("max_iter"), py::arg("tol"),
      py::arg("beta"), py::arg("alpha_w"), py::arg("alpha_h"), py::arg("l1_ratio"),
      py::arg("update_h"), py::arg("n_iter"), py::arg("num_threads"),
      R"pbdoc(
        Beta-divergence MU NMF (scikit-learn's rules, ong_kernels/nmf_beta.py) of a whole
        ragged batch in ONE call (GIL released); W H is formed one tile at a time, never whole.

        table: host address of the int64 table of ong_kernels.nmf_plan.matrix_table; every V
        float32. n_iter: int64 output. update_h=False keeps H fixed. Raises ValueError on a
        malformed table or loss before touching anything.
      )pbdoc");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ong_kernels compiled kernels (CPU always; CUDA when built with it)";
#ifdef ONG_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  bind_common(m);
  bind_masked_sgd(m);
  bind_nmf_mu(m);
  bind_nmf_beta(m);
  bind_sketch_product(m);
}
