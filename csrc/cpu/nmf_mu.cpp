// The CPU NMF entry point: validates the whole table, then hands the batch to the solver of
// the active ISA (csrc/cpu/nmf_mu_kernel.h, compiled once per ISA).
#include <cmath>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "ong_isa.h"
#include "ong_nmf.h"

namespace ong {
namespace {

[[noreturn]] void bad_row(const char* op, std::int64_t i, const std::string& what) {
  throw std::invalid_argument(std::string(op) + ": matrix " + std::to_string(i) + ": " + what);
}

DType checked_dtype(std::int64_t i, std::int64_t code) {
#define ONG_NMF_DTYPE_CASE(e, c, name) \
  if (code == c) return DType::e;
  ONG_DTYPES(ONG_NMF_DTYPE_CASE)
#undef ONG_NMF_DTYPE_CASE
  bad_row("nmf_mu_cpu", i, "unknown dtype code " + std::to_string(code));
}

}  // namespace

void check_nmf_row(const char* op, std::int64_t i, const NmfMatrix& t) {
  constexpr std::int64_t kMaxDim = std::int64_t{1} << 31;
  if (t.m <= 0 || t.n <= 0 || t.r <= 0) bad_row(op, i, "m, n and r must be > 0");
  if (t.m > kMaxDim || t.n > kMaxDim) bad_row(op, i, "m and n must be < 2^31");
  if (t.r > t.m || t.r > t.n) bad_row(op, i, "r must be <= min(m, n)");
  if (t.v == 0 || t.w == 0 || t.h == 0) bad_row(op, i, "null V, W or H address");
}

void nmf_mu_cpu(const NmfMatrix* table, const std::int64_t* dtypes, std::int64_t n_matrices,
                std::int64_t max_iter, double tol, std::int64_t* n_iter, int num_threads) {
  if (n_matrices < 0) throw std::invalid_argument("nmf_mu_cpu: n_matrices must be >= 0");
  if (n_matrices > 0 && (table == nullptr || dtypes == nullptr || n_iter == nullptr))
    throw std::invalid_argument("nmf_mu_cpu: table, dtypes and n_iter must be non-null");
  if (max_iter < 0) throw std::invalid_argument("nmf_mu_cpu: max_iter must be >= 0");
  if (!(tol >= 0) || !std::isfinite(tol))
    throw std::invalid_argument("nmf_mu_cpu: tol must be finite and >= 0");
  // Every row is checked before anything is touched: sizes that index out of bounds (or
  // overflow the int64 element counts) never reach the kernels.
  std::vector<nmf::Job> jobs(static_cast<std::size_t>(n_matrices));
  for (std::int64_t i = 0; i < n_matrices; ++i) {
    const NmfMatrix& t = table[i];
    check_nmf_row("nmf_mu_cpu", i, t);
    jobs[i] = nmf::Job{reinterpret_cast<const void*>(t.v), checked_dtype(i, dtypes[i]),
                       reinterpret_cast<float*>(t.w), reinterpret_cast<float*>(t.h),
                       t.m, t.n, t.r, n_iter + i};
  }
  if (n_matrices == 0) return;
  bool ok;
  switch (active_isa()) {
#ifdef ONG_HAVE_X86_KERNELS
    case Isa::kAvx512:
      ok = nmf::solve_batch_avx512(jobs.data(), n_matrices, max_iter, tol, num_threads);
      break;
    case Isa::kAvx2:
      ok = nmf::solve_batch_avx2(jobs.data(), n_matrices, max_iter, tol, num_threads);
      break;
#endif
    default:
      ok = nmf::solve_batch_portable(jobs.data(), n_matrices, max_iter, tol, num_threads);
      break;
  }
  if (!ok) throw std::bad_alloc();
}

void sketch_product_cpu(const float* v, std::int64_t m, std::int64_t n, const float* x,
                        std::int64_t wp, float* out, bool transpose, int num_threads) {
  constexpr std::int64_t kMaxDim = std::int64_t{1} << 31;
  if (m <= 0 || n <= 0 || m >= kMaxDim || n >= kMaxDim)
    throw std::invalid_argument("sketch_product_cpu: m and n must be in [1, 2^31)");
  if (wp <= 0 || wp % 16 != 0 || wp >= kMaxDim)
    throw std::invalid_argument("sketch_product_cpu: wp must be a positive multiple of 16");
  if (v == nullptr || x == nullptr || out == nullptr)
    throw std::invalid_argument("sketch_product_cpu: null V, X or out address");
  bool ok;
  switch (active_isa()) {
#ifdef ONG_HAVE_X86_KERNELS
    case Isa::kAvx512:
      ok = nmf::sketch_product_avx512(v, m, n, x, wp, out, transpose, num_threads);
      break;
    case Isa::kAvx2:
      ok = nmf::sketch_product_avx2(v, m, n, x, wp, out, transpose, num_threads);
      break;
#endif
    default:
      ok = nmf::sketch_product_portable(v, m, n, x, wp, out, transpose, num_threads);
      break;
  }
  if (!ok) throw std::bad_alloc();
}

}  // namespace ong
