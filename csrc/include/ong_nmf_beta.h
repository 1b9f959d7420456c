// Beta-divergence multiplicative-update NMF of a ragged batch on the CPU (op nmf_beta_mu_):
// scikit-learn's MU rules for any beta with its regularisation, per-matrix stopping on the
// beta-divergence, and a fixed-H mode (ong_kernels/nmf_beta.py states the rules; the reference
// kernel ong_kernels/backends/reference_beta.py is the oracle).
//
// The batch arrives as the table of ong_nmf.h (V addresses must be float32 here: the Python
// side converts other dtypes one matrix at a time).
#pragma once

#include <cstdint>

#include "ong_nmf.h"

namespace ong {

struct NmfBetaLoss {
  double beta;
  double alpha_w;
  double alpha_h;
  double l1_ratio;
  bool update_h;
};

// Solves every matrix of the table; n_iter receives the iterations run per matrix. Throws
// std::invalid_argument (before touching anything) on a malformed table or loss.
void nmf_beta_cpu(const NmfMatrix* table, std::int64_t n_matrices, std::int64_t max_iter,
                  double tol, const NmfBetaLoss& loss, std::int64_t* n_iter, int num_threads);

namespace nmf_beta {

struct Job {
  const float* v;
  float* w;
  float* h;
  std::int64_t m, n, r;
  std::int64_t* n_iter;
};

// Per-ISA solvers (csrc/cpu/nmf_beta_{portable,avx2,avx512}.cpp, one generic kernel,
// csrc/cpu/nmf_beta_kernel.h). Return false if memory ran out.
bool solve_batch_portable(const Job* jobs, std::int64_t n_jobs, std::int64_t max_iter,
                          double tol, const NmfBetaLoss& loss, int num_threads);
bool solve_batch_avx2(const Job* jobs, std::int64_t n_jobs, std::int64_t max_iter, double tol,
                      const NmfBetaLoss& loss, int num_threads);
bool solve_batch_avx512(const Job* jobs, std::int64_t n_jobs, std::int64_t max_iter,
                        double tol, const NmfBetaLoss& loss, int num_threads);

}  // namespace nmf_beta
}  // namespace ong
