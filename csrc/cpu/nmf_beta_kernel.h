// The generic CPU beta-divergence MU solver, compiled once per ISA: nmf_beta_portable.cpp,
// nmf_beta_avx2.cpp and nmf_beta_avx512.cpp define ONG_NMF_BETA_NS (a per-ISA namespace, so
// no inline function compiled with AVX-512 is the copy the linker keeps for another ISA) and
// ONG_NMF_BETA_SOLVE_BATCH, then include this file. The loops are written for the compiler's
// vectoriser (`omp simd`, contiguous inner loops over columns).
//
// Per matrix V (m x n), W (m x r), H (r x n), all row-major float32, every step in
// scikit-learn's element order (ong_kernels/nmf_beta.py):
//   W sweep, per block of kRows rows (parallel over blocks), per chunk of kCols columns:
//     T = W_blk H_chunk (the tile of W H), A = V o f(T), B = g(T) (beta not 1 or 2)
//     num_W += A H_chunk^T, den_W += B H_chunk^T; then the block's update.
//   H sweep, per chunk of kCols columns (parallel over chunks), per block of rows:
//     T = W_blk H_chunk with the new W, num_H += W_blk^T A, den_H += W_blk^T B; the update.
// so W H and V / (W H)^(2 - beta) exist one tile at a time and the extra memory is
// O((m + n) r) plus one tile per thread. beta = 2 skips the tile: num = V H^T, den = W (H H^T)
// (and (W^T W) H); beta = 1's denominators are H's row sums and W's column sums. Each cost:
// 2 m n r flops per product, so 8 m n r per iteration for KL (scikit-learn's count), 12 for
// other betas, 4 for beta = 2.
//
// The blocks never depend on the thread count and the error's partial sums are added in
// block order, so one thread and a team give bitwise identical results. The stopping error
// (check iterations only) recomputes W H in double.

#ifndef ONG_NMF_BETA_NS
#error "define ONG_NMF_BETA_NS and ONG_NMF_BETA_SOLVE_BATCH before including nmf_beta_kernel.h"
#endif

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <new>
#include <vector>

#include "ong_nmf_beta.h"

namespace ong {
namespace nmf_beta {
namespace ONG_NMF_BETA_NS {
namespace {

using i64 = std::int64_t;
// scikit-learn's EPSILON (float32 eps) and its factor threshold (float64 eps, as float32).
constexpr float kEps = 1.1920928955078125e-07f;
constexpr float kTiny = 2.220446049250313e-16f;
constexpr int kCheckEvery = 10;  // nmf_plan.CHECK_EVERY
// Tile: kRows rows x kCols columns of W H (16 KiB of float32), with its A and B tiles in L1/L2.
constexpr i64 kRows = 16;
constexpr i64 kCols = 256;

enum class Kind { kFrobenius, kKl, kIs, kOther };

struct Rules {
  Kind kind;
  float beta;
  float gamma;
  float l1_w, l1_h, l2_w, l2_h;
  bool update_h;

  Rules(const NmfBetaLoss& loss, i64 m, i64 n) {
    const double b = loss.beta;
    beta = static_cast<float>(b);
    kind = b == 2 ? Kind::kFrobenius : b == 1 ? Kind::kKl : b == 0 ? Kind::kIs : Kind::kOther;
    gamma = static_cast<float>(b < 1 ? 1.0 / (2.0 - b) : b > 2 ? 1.0 / (b - 1.0) : 1.0);
    l1_w = static_cast<float>(n * loss.alpha_w * loss.l1_ratio);
    l1_h = static_cast<float>(m * loss.alpha_h * loss.l1_ratio);
    l2_w = static_cast<float>(n * loss.alpha_w * (1.0 - loss.l1_ratio));
    l2_h = static_cast<float>(m * loss.alpha_h * (1.0 - loss.l1_ratio));
    update_h = loss.update_h;
  }
  bool has_tile() const { return kind != Kind::kFrobenius; }
  bool has_b() const { return kind == Kind::kIs || kind == Kind::kOther; }

};

// What one thread holds: a W H tile, its A and B tiles, and a block's or chunk's num/den.
struct Scratch {
  std::vector<float> t, a, b, num, den;
  void reserve(i64 r) {
    t.assign(kRows * kCols, 0.0f);
    a.assign(kRows * kCols, 0.0f);
    b.assign(kRows * kCols, 0.0f);
    num.assign(std::max(kRows, kCols) * r, 0.0f);
    den.assign(std::max(kRows, kCols) * r, 0.0f);
  }
};

// Columns one register block of the products holds: 64 floats (4 zmm / 8 ymm accumulators),
// so an FMA loads one operand instead of loading and storing a tile row per k.
constexpr i64 kLanes = 64;

// T (rows x cols, row stride kCols) = W[i0:i0+rows, :] H[:, j0:j0+cols]
void wh_tile(const Job& job, i64 i0, i64 rows, i64 j0, i64 cols, float* t) {
  const i64 r = job.r, n = job.n;
  for (i64 ii = 0; ii < rows; ++ii) {
    float* tr = t + ii * kCols;
    const float* wr = job.w + (i0 + ii) * r;
    i64 jb = 0;
    for (; jb + kLanes <= cols; jb += kLanes) {
      float acc[kLanes] = {};
      for (i64 k = 0; k < r; ++k) {
        const float wk = wr[k];
        const float* hk = job.h + k * n + j0 + jb;
#pragma omp simd
        for (i64 j = 0; j < kLanes; ++j) acc[j] += wk * hk[j];
      }
#pragma omp simd
      for (i64 j = 0; j < kLanes; ++j) tr[jb + j] = acc[j];
    }
    for (i64 j = jb; j < cols; ++j) tr[j] = 0.0f;
    for (i64 k = 0; k < r && jb < cols; ++k) {
      const float wk = wr[k];
      const float* hk = job.h + k * n + j0;
      for (i64 j = jb; j < cols; ++j) tr[j] += wk * hk[j];
    }
  }
}

// A = V o f(T), B = g(T) over a tile; for beta = 2, A is V's tile itself (copied). One loop
// per kind, so the vectoriser sees no branch on the loss inside.
void ratio_tiles(const Rules& rules, const Job& job, i64 i0, i64 rows, i64 j0, i64 cols,
                 const float* t, float* a, float* b) {
  const float beta = rules.beta;
  for (i64 ii = 0; ii < rows; ++ii) {
    const float* vr = job.v + (i0 + ii) * job.n + j0;
    const float* tr = t + ii * kCols;
    float* ar = a + ii * kCols;
    float* br = b + ii * kCols;
    switch (rules.kind) {
      case Kind::kFrobenius:
#pragma omp simd
        for (i64 j = 0; j < cols; ++j) ar[j] = vr[j];
        break;
      case Kind::kKl:
#pragma omp simd
        for (i64 j = 0; j < cols; ++j) ar[j] = vr[j] / (tr[j] < kEps ? kEps : tr[j]);
        break;
      case Kind::kIs:
#pragma omp simd
        for (i64 j = 0; j < cols; ++j) {
          const float c = tr[j] < kEps ? kEps : tr[j];
          const float inv = 1.0f / c;
          ar[j] = inv * inv * vr[j];
          br[j] = inv;  // beta < 1: the denominator's W H is clipped the same way
        }
        break;
      case Kind::kOther:
        for (i64 j = 0; j < cols; ++j) {
          const float c = (beta < 2 && tr[j] < kEps) ? kEps : tr[j];
          ar[j] = std::pow(c, beta - 2.0f) * vr[j];
          const float d = (beta < 1 && tr[j] < kEps) ? kEps : tr[j];
          br[j] = std::pow(d, beta - 1.0f);
        }
        break;
    }
  }
}

// out[ii, k] += sum_j X[ii, j] H[k, j0 + j]  (X: rows x cols tile, out: rows x r); four
// k at a time, so each X element loaded serves four FMAs.
void times_ht(const Job& job, i64 rows, i64 j0, i64 cols, const float* x, float* out) {
  const i64 r = job.r, n = job.n;
  for (i64 ii = 0; ii < rows; ++ii) {
    const float* xr = x + ii * kCols;
    i64 k = 0;
    for (; k + 4 <= r; k += 4) {
      const float* h0 = job.h + k * n + j0;
      const float* h1 = h0 + n;
      const float* h2 = h1 + n;
      const float* h3 = h2 + n;
      float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (i64 j = 0; j < cols; ++j) {
        s0 += xr[j] * h0[j];
        s1 += xr[j] * h1[j];
        s2 += xr[j] * h2[j];
        s3 += xr[j] * h3[j];
      }
      out[ii * r + k] += s0;
      out[ii * r + k + 1] += s1;
      out[ii * r + k + 2] += s2;
      out[ii * r + k + 3] += s3;
    }
    for (; k < r; ++k) {
      const float* hk = job.h + k * n + j0;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (i64 j = 0; j < cols; ++j) s += xr[j] * hk[j];
      out[ii * r + k] += s;
    }
  }
}

// out[k, j] += sum_ii W[i0 + ii, k] X[ii, j]  (out: r x kCols), one register block of
// columns at a time.
void wt_times(const Job& job, i64 i0, i64 rows, i64 cols, const float* x, float* out) {
  const i64 r = job.r;
  const float* w = job.w + i0 * r;
  for (i64 k = 0; k < r; ++k) {
    float* ok = out + k * kCols;
    i64 jb = 0;
    for (; jb + kLanes <= cols; jb += kLanes) {
      float acc[kLanes];
#pragma omp simd
      for (i64 j = 0; j < kLanes; ++j) acc[j] = ok[jb + j];
      for (i64 ii = 0; ii < rows; ++ii) {
        const float wk = w[ii * r + k];
        const float* xr = x + ii * kCols + jb;
#pragma omp simd
        for (i64 j = 0; j < kLanes; ++j) acc[j] += wk * xr[j];
      }
#pragma omp simd
      for (i64 j = 0; j < kLanes; ++j) ok[jb + j] = acc[j];
    }
    for (i64 ii = 0; ii < rows && jb < cols; ++ii) {
      const float wk = w[ii * r + k];
      const float* xr = x + ii * kCols;
      for (i64 j = jb; j < cols; ++j) ok[j] += wk * xr[j];
    }
  }
}

// factor *= (num / (den + l1 + l2 * factor))^gamma, a zero denominator made EPS.
inline float updated(float f, float num, float den, float l1, float l2, float gamma) {
  if (l1 > 0) den += l1;
  if (l2 > 0) den = den + l2 * f;
  if (den == 0) den = kEps;
  float delta = num / den;
  if (gamma != 1.0f) delta = std::pow(delta, gamma);
  return f * delta;
}

class Solver {
 public:
  Solver(const Job& job, const NmfBetaLoss& loss, int team)
      : job_(job), rules_(loss, job.m, job.n), team_(team) {}

  bool prepare() {
    try {
      scratch_.resize(static_cast<std::size_t>(team_));
      for (auto& s : scratch_) s.reserve(job_.r);
      gram_.assign(job_.r * job_.r, 0.0f);
      sums_.assign(job_.r, 0.0f);
      const i64 blocks = (job_.m + kRows - 1) / kRows;
      partial_.assign(blocks, 0.0);
    } catch (const std::bad_alloc&) {
      return false;
    }
    return true;
  }

  void iterate() {
    w_sweep();
    if (rules_.update_h) h_sweep();
  }

  // sqrt(2 max(D_beta(V | W H), 0)), W H in double (nmf_beta.divergence).
  double error() {
    const i64 m = job_.m, n = job_.n, r = job_.r;
    const i64 blocks = (m + kRows - 1) / kRows;
    const double beta = rules_.beta;
    const Kind kind = rules_.kind;
#pragma omp parallel for schedule(static) num_threads(team_) if (team_ > 1)
    for (i64 bi = 0; bi < blocks; ++bi) {
      std::vector<double> wh(static_cast<std::size_t>(n));
      double total = 0.0;
      const i64 i_end = std::min(m, (bi + 1) * kRows);
      for (i64 i = bi * kRows; i < i_end; ++i) {
        std::fill(wh.begin(), wh.end(), 0.0);
        for (i64 k = 0; k < r; ++k) {
          const double wk = job_.w[i * r + k];
          const float* hk = job_.h + k * n;
#pragma omp simd
          for (i64 j = 0; j < n; ++j) wh[j] += wk * static_cast<double>(hk[j]);
        }
        const float* vr = job_.v + i * n;
        for (i64 j = 0; j < n; ++j) {
          const double x = vr[j], y = wh[j];
          if (kind == Kind::kFrobenius) {
            total += 0.5 * (x - y) * (x - y);
            continue;
          }
          const bool keep = x > kEps;
          const double c = y < kEps ? static_cast<double>(kEps) : y;
          if (kind == Kind::kKl) {
            total += y + (keep ? x * std::log(x / c) - x : 0.0);
          } else if (kind == Kind::kIs) {
            total += keep ? (x / c - std::log(x / c)) - 1.0 : -1.0;
          } else {
            double term = std::pow(y, beta) * (beta - 1);
            if (keep) term += std::pow(x, beta) - beta * x * std::pow(c, beta - 1);
            total += term / (beta * (beta - 1));
          }
        }
      }
      partial_[bi] = total;
    }
    double res = 0.0;
    for (double p : partial_) res += p;
    return std::sqrt(2.0 * std::max(res, 0.0));
  }

 private:
  void w_sweep() {
    const i64 m = job_.m, n = job_.n, r = job_.r;
    if (rules_.kind == Kind::kFrobenius) gram(job_.h, r, n, /*rows=*/true);
    if (rules_.kind == Kind::kKl) {
      for (i64 k = 0; k < r; ++k) {  // row sums of H, accumulated in double
        double s = 0.0;
        const float* hk = job_.h + k * n;
        for (i64 j = 0; j < n; ++j) s += hk[j];
        sums_[k] = static_cast<float>(s);
      }
    }
    const i64 blocks = (m + kRows - 1) / kRows;
#pragma omp parallel for schedule(static) num_threads(team_) if (team_ > 1)
    for (i64 bi = 0; bi < blocks; ++bi) {
      Scratch& s = scratch_[omp_get_thread_num()];
      const i64 i0 = bi * kRows, rows = std::min(kRows, m - i0);
      std::fill(s.num.begin(), s.num.begin() + rows * r, 0.0f);
      std::fill(s.den.begin(), s.den.begin() + rows * r, 0.0f);
      for (i64 j0 = 0; j0 < n; j0 += kCols) {
        const i64 cols = std::min(kCols, n - j0);
        if (rules_.has_tile()) wh_tile(job_, i0, rows, j0, cols, s.t.data());
        ratio_tiles(rules_, job_, i0, rows, j0, cols, s.t.data(), s.a.data(), s.b.data());
        times_ht(job_, rows, j0, cols, s.a.data(), s.num.data());
        if (rules_.has_b()) times_ht(job_, rows, j0, cols, s.b.data(), s.den.data());
      }
      for (i64 ii = 0; ii < rows; ++ii) {
        float* wr = job_.w + (i0 + ii) * r;
        float* den = s.den.data() + ii * r;
        if (rules_.kind == Kind::kFrobenius) {  // den = W (H H^T)
          for (i64 k = 0; k < r; ++k) {
            float d = 0.0f;
            for (i64 q = 0; q < r; ++q) d += wr[q] * gram_[q * r + k];
            den[k] = d;
          }
        } else if (rules_.kind == Kind::kKl) {
          for (i64 k = 0; k < r; ++k) den[k] = sums_[k];
        }
        const float* num = s.num.data() + ii * r;
        for (i64 k = 0; k < r; ++k) {
          float w = updated(wr[k], num[k], den[k], rules_.l1_w, rules_.l2_w, rules_.gamma);
          if (rules_.beta < 1 && w < kTiny) w = 0.0f;
          wr[k] = w;
        }
      }
    }
  }

  void h_sweep() {
    const i64 m = job_.m, n = job_.n, r = job_.r;
    if (rules_.kind == Kind::kFrobenius) gram(job_.w, m, r, /*rows=*/false);
    if (rules_.kind == Kind::kKl) {
      std::vector<double> acc(static_cast<std::size_t>(r), 0.0);  // W's column sums
      for (i64 i = 0; i < m; ++i)
        for (i64 k = 0; k < r; ++k) acc[k] += job_.w[i * r + k];
      for (i64 k = 0; k < r; ++k)  // scikit-learn's W_sum[W_sum == 0] = 1
        sums_[k] = acc[k] == 0 ? 1.0f : static_cast<float>(acc[k]);
    }
    const i64 chunks = (n + kCols - 1) / kCols;
#pragma omp parallel for schedule(static) num_threads(team_) if (team_ > 1)
    for (i64 ci = 0; ci < chunks; ++ci) {
      Scratch& s = scratch_[omp_get_thread_num()];
      const i64 j0 = ci * kCols, cols = std::min(kCols, n - j0);
      std::fill(s.num.begin(), s.num.begin() + r * kCols, 0.0f);
      std::fill(s.den.begin(), s.den.begin() + r * kCols, 0.0f);
      for (i64 i0 = 0; i0 < m; i0 += kRows) {
        const i64 rows = std::min(kRows, m - i0);
        if (rules_.has_tile()) wh_tile(job_, i0, rows, j0, cols, s.t.data());
        ratio_tiles(rules_, job_, i0, rows, j0, cols, s.t.data(), s.a.data(), s.b.data());
        wt_times(job_, i0, rows, cols, s.a.data(), s.num.data());
        if (rules_.has_b()) wt_times(job_, i0, rows, cols, s.b.data(), s.den.data());
      }
      for (i64 k = 0; k < r; ++k) {
        float* den = s.den.data() + k * kCols;
        if (rules_.kind == Kind::kFrobenius) {  // den = (W^T W) H
          for (i64 j = 0; j < cols; ++j) {
            float d = 0.0f;
            for (i64 q = 0; q < r; ++q) d += gram_[k * r + q] * job_.h[q * n + j0 + j];
            den[j] = d;
          }
        } else if (rules_.kind == Kind::kKl) {
          for (i64 j = 0; j < cols; ++j) den[j] = sums_[k];
        }
      }
      // H's chunk is read by the denominators above (beta = 2) before any of it is written.
      for (i64 k = 0; k < r; ++k) {
        float* hk = job_.h + k * n + j0;
        const float* num = s.num.data() + k * kCols;
        const float* den = s.den.data() + k * kCols;
        for (i64 j = 0; j < cols; ++j) {
          float h = updated(hk[j], num[j], den[j], rules_.l1_h, rules_.l2_h, rules_.gamma);
          if (rules_.beta <= 1 && h < kTiny) h = 0.0f;
          hk[j] = h;
        }
      }
    }
  }

  // gram_ = X X^T for X r x cols (rows=true: H H^T) or X^T X for X rows x r (W^T W).
  void gram(const float* x, i64 a, i64 b, bool rows) {
    const i64 r = job_.r;
    std::fill(gram_.begin(), gram_.end(), 0.0f);
    if (rows) {  // H (r x n): gram[p, q] = sum_j H[p, j] H[q, j]
      for (i64 p = 0; p < r; ++p)
        for (i64 q = 0; q <= p; ++q) {
          float s = 0.0f;
#pragma omp simd reduction(+ : s)
          for (i64 j = 0; j < b; ++j) s += x[p * b + j] * x[q * b + j];
          gram_[p * r + q] = gram_[q * r + p] = s;
        }
    } else {  // W (m x r): gram[p, q] = sum_i W[i, p] W[i, q]
      for (i64 i = 0; i < a; ++i)
        for (i64 p = 0; p < r; ++p) {
          const float wp = x[i * r + p];
#pragma omp simd
          for (i64 q = 0; q < r; ++q) gram_[p * r + q] += wp * x[i * r + q];
        }
    }
  }

  Job job_;
  Rules rules_;
  int team_;
  std::vector<Scratch> scratch_;
  std::vector<float> gram_, sums_;
  std::vector<double> partial_;
};

// scikit-learn's loop for one matrix: checks every kCheckEvery iterations below max_iter
// (none when tol == 0), nmf_plan.stop_rule.
bool solve_one(const Job& job, i64 max_iter, double tol, const NmfBetaLoss& loss, int team) {
  Solver solver(job, loss, team);
  if (!solver.prepare()) return false;
  *job.n_iter = max_iter;
  if (tol <= 0) {
    for (i64 it = 0; it < max_iter; ++it) solver.iterate();
    return true;
  }
  const double initial = solver.error();
  double previous = initial;
  for (i64 it = 1; it <= max_iter; ++it) {
    solver.iterate();
    if (it % kCheckEvery == 0 && it < max_iter) {
      const double current = solver.error();
      const double safe = initial > 0 ? initial : 1.0;
      if (initial <= 0 || (previous - current) / safe < tol) {
        *job.n_iter = it;
        return true;
      }
      previous = current;
    }
  }
  return true;
}

}  // namespace
}  // namespace ONG_NMF_BETA_NS

// Many matrices: one thread per matrix (dynamic: each stops on its own); fewer matrices than
// threads: each matrix by the whole team, one after another.
bool ONG_NMF_BETA_SOLVE_BATCH(const Job* jobs, std::int64_t n_jobs, std::int64_t max_iter,
                              double tol, const NmfBetaLoss& loss, int num_threads) {
  using ONG_NMF_BETA_NS::solve_one;
  const int threads = std::max(1, num_threads);
  if (n_jobs >= threads && threads > 1) {
    bool ok = true;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) reduction(&& : ok)
    for (std::int64_t i = 0; i < n_jobs; ++i)
      ok = solve_one(jobs[i], max_iter, tol, loss, 1) && ok;
    return ok;
  }
  for (std::int64_t i = 0; i < n_jobs; ++i)
    if (!solve_one(jobs[i], max_iter, tol, loss, threads)) return false;
  return true;
}

}  // namespace nmf_beta
}  // namespace ong
