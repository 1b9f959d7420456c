// The CPU beta-divergence NMF entry point (op nmf_beta_mu_): validates the whole table and the
// loss, then hands the batch to the solver of the active ISA (csrc/cpu/nmf_beta_kernel.h).
#include <cmath>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "ong_isa.h"
#include "ong_nmf_beta.h"

namespace ong {
namespace {

bool finite_at_least(double x, double low) { return std::isfinite(x) && x >= low; }

}  // namespace

void nmf_beta_cpu(const NmfMatrix* table, std::int64_t n_matrices, std::int64_t max_iter,
                  double tol, const NmfBetaLoss& loss, std::int64_t* n_iter, int num_threads) {
  if (n_matrices < 0) throw std::invalid_argument("nmf_beta_cpu: n_matrices must be >= 0");
  if (n_matrices > 0 && (table == nullptr || n_iter == nullptr))
    throw std::invalid_argument("nmf_beta_cpu: table and n_iter must be non-null");
  if (max_iter < 0) throw std::invalid_argument("nmf_beta_cpu: max_iter must be >= 0");
  if (!finite_at_least(tol, 0)) throw std::invalid_argument("nmf_beta_cpu: tol must be >= 0");
  if (!std::isfinite(loss.beta)) throw std::invalid_argument("nmf_beta_cpu: beta must be finite");
  if (!finite_at_least(loss.alpha_w, 0) || !finite_at_least(loss.alpha_h, 0))
    throw std::invalid_argument("nmf_beta_cpu: alpha_w and alpha_h must be finite and >= 0");
  if (!finite_at_least(loss.l1_ratio, 0) || loss.l1_ratio > 1)
    throw std::invalid_argument("nmf_beta_cpu: l1_ratio must be in [0, 1]");
  // Every row is checked before anything is touched (sizes that would index out of bounds
  // never reach the kernels); r <= min(m, n) as the op's check.
  std::vector<nmf_beta::Job> jobs(static_cast<std::size_t>(n_matrices));
  for (std::int64_t i = 0; i < n_matrices; ++i) {
    const NmfMatrix& t = table[i];
    check_nmf_row("nmf_beta_cpu", i, t);
    jobs[i] = nmf_beta::Job{reinterpret_cast<const float*>(t.v), reinterpret_cast<float*>(t.w),
                            reinterpret_cast<float*>(t.h), t.m, t.n, t.r, n_iter + i};
  }
  if (n_matrices == 0) return;
  bool ok;
  switch (active_isa()) {
#ifdef ONG_HAVE_X86_KERNELS
    case Isa::kAvx512:
      ok = nmf_beta::solve_batch_avx512(jobs.data(), n_matrices, max_iter, tol, loss,
                                        num_threads);
      break;
    case Isa::kAvx2:
      ok = nmf_beta::solve_batch_avx2(jobs.data(), n_matrices, max_iter, tol, loss, num_threads);
      break;
#endif
    default:
      ok = nmf_beta::solve_batch_portable(jobs.data(), n_matrices, max_iter, tol, loss,
                                          num_threads);
      break;
  }
  if (!ok) throw std::bad_alloc();
}

}  // namespace ong
