// Multiplicative-update NMF of a ragged batch on the CPU: one call solves every matrix.
//
// The batch arrives as the int64 table of ong_kernels/nmf_plan.py `matrix_table` (one row
// (V, W, H addresses, m, n, r) per matrix; raw host addresses) plus one dtype code per V.
// Semantics are the reference backend's (ong_kernels/backends/reference.py): scikit-learn's
// update order and epsilon rule, its stopping rule checked every 10 iterations per matrix,
// the error ||V - WH||_F in float64.
#pragma once

#include <cstdint>

#include "ong_dtype.h"

namespace ong {

struct NmfMatrix {
  std::int64_t v;  // address of V (m x n, row-major, contiguous), dtype given separately
  std::int64_t w;  // address of W (m x r, float32, contiguous), updated in place
  std::int64_t h;  // address of H (r x n, float32, contiguous), updated in place
  std::int64_t m;
  std::int64_t n;
  std::int64_t r;
};
static_assert(sizeof(NmfMatrix) == 6 * sizeof(std::int64_t), "NmfMatrix is one table row");

// Throws std::invalid_argument("<op>: matrix <i>: ...") unless row i of a table is one the
// kernels may index: m, n, r > 0, m, n < 2^31, r <= min(m, n), non-null V, W and H. Every
// CPU NMF entry point checks its whole table with it before touching anything.
void check_nmf_row(const char* op, std::int64_t i, const NmfMatrix& t);

// Solves every matrix of the table (max_iter iterations, or fewer where scikit-learn's rule
// stops it; tol == 0: no checks) and writes the iterations run per matrix to n_iter.
// Throws std::invalid_argument (before touching anything) on a malformed table.
void nmf_mu_cpu(const NmfMatrix* table, const std::int64_t* dtypes, std::int64_t n_matrices,
                std::int64_t max_iter, double tol, std::int64_t* n_iter, int num_threads);

// The randomized SVD's sketch products (ong_kernels/nmf_init.py) with the MU kernels' tiles:
// out = V X (transpose false: X n x wp, out m x wp) or out = V^T X (transpose true: X m x wp,
// out n x wp); V m x n float32 row-major, X and out float32 row-major, wp a multiple of 16.
// Throws std::invalid_argument (before touching anything) on sizes out of range or a null
// address, std::bad_alloc if memory ran out.
void sketch_product_cpu(const float* v, std::int64_t m, std::int64_t n, const float* x,
                        std::int64_t wp, float* out, bool transpose, int num_threads);

namespace nmf {

// One validated matrix of the batch, as the per-ISA solvers take it.
struct Job {
  const void* v;
  DType dtype;
  float* w;
  float* h;
  std::int64_t m, n, r;
  std::int64_t* n_iter;
};

// Per-ISA batch solvers (csrc/cpu/nmf_mu_{portable,avx2,avx512}.cpp, one generic kernel,
// csrc/cpu/nmf_mu_kernel.h, compiled three times). Return false if memory ran out.
bool solve_batch_portable(const Job* jobs, std::int64_t n_jobs, std::int64_t max_iter,
                          double tol, int num_threads);
bool solve_batch_avx2(const Job* jobs, std::int64_t n_jobs, std::int64_t max_iter, double tol,
                      int num_threads);
bool solve_batch_avx512(const Job* jobs, std::int64_t n_jobs, std::int64_t max_iter, double tol,
                        int num_threads);
// Per-ISA sketch products (sketch_product_cpu, unchecked). Return false if memory ran out.
bool sketch_product_portable(const float* v, std::int64_t m, std::int64_t n, const float* x,
                             std::int64_t wp, float* out, bool transpose, int num_threads);
bool sketch_product_avx2(const float* v, std::int64_t m, std::int64_t n, const float* x,
                         std::int64_t wp, float* out, bool transpose, int num_threads);
bool sketch_product_avx512(const float* v, std::int64_t m, std::int64_t n, const float* x,
                           std::int64_t wp, float* out, bool transpose, int num_threads);

}  // namespace nmf
}  // namespace ong
