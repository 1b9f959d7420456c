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
#include <cstring>
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
// The H sweep's column chunks (its unit of parallel work): narrower than kCols so that a
// matrix with few columns still splits evenly over the team. Fashion-MNIST (n = 784, 2
// threads): 256-column chunks gave the threads 512 and 272 columns (the H sweep took 97 ms
// against the W sweep's 66 ms, same flops). A multiple of the register tiles' 16 columns, so
// every column is computed by the same loop (tile or tail) as with kCols: no result changes.
constexpr i64 kHCols = 128;

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
  // Zero the first `count` numerator and denominator sums (a block's or a chunk's).
  void clear(i64 count) {
    std::fill(num.begin(), num.begin() + count, 0.0f);
    std::fill(den.begin(), den.begin() + count, 0.0f);
  }
};


// ln x, 4 doubles at a time, for the stopping error's KL and IS terms: x = 2^e m with m in
// [sqrt(1/2), sqrt(2)), ln x = e ln 2 + 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.172, the
// odd series to s^23 (the next term is below 2^-60 of s) and ln 2 split in two (fdlibm's
// ln2_hi has 21 trailing zero bits: e ln2_hi is exact). Within 2 ulp of std::log for
// positive normal finite x (measured over 4M values from e^-60 to e^60); callers take
// std::log for any other lane. A cNMF-shaped KL solve (2,000 x 784, ranks 5-15, a check every
// 10 iterations) took 90.5 s with std::log one entry at a time, 71-76 s with this (Zen 4).
typedef double Vec4d __attribute__((vector_size(32)));
typedef std::int64_t Vec4l __attribute__((vector_size(32)));

inline Vec4d log4(Vec4d x) {
  constexpr double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;
  Vec4l bits;
  std::memcpy(&bits, &x, sizeof(bits));
  Vec4l e = ((bits >> 52) & 0x7ff) - 1023;
  const Vec4l mant = (bits & 0x000fffffffffffffLL) | 0x3ff0000000000000LL;
  Vec4d m;
  std::memcpy(&m, &mant, sizeof(m));  // [1, 2)
  const Vec4l high = m > 1.4142135623730951;  // -1 where m > sqrt(2)
  m = high ? m * 0.5 : m;
  e -= high;
  const Vec4d s = (m - 1.0) / (m + 1.0), s2 = s * s;
  Vec4d p = s2 * (1.0 / 23) + 1.0 / 21;
  p = p * s2 + 1.0 / 19;
  p = p * s2 + 1.0 / 17;
  p = p * s2 + 1.0 / 15;
  p = p * s2 + 1.0 / 13;
  p = p * s2 + 1.0 / 11;
  p = p * s2 + 1.0 / 9;
  p = p * s2 + 1.0 / 7;
  p = p * s2 + 1.0 / 5;
  p = p * s2 + 1.0 / 3;
  const Vec4d ed = __builtin_convertvector(e, Vec4d);
  return ed * kLn2Hi + (2.0 * (s + s * s2 * p) + ed * kLn2Lo);
}

// logs[j] = ln(ratio[j]) for j < n: log4 over whole vectors, std::log for the tail and for
// any entry that is not a positive normal finite double.
inline void log_row(const double* ratio, double* logs, i64 n) {
  i64 j = 0;
  for (; j + 4 <= n; j += 4) {
    Vec4d x;
    std::memcpy(&x, ratio + j, sizeof(x));
    const Vec4d y = log4(x);
    std::memcpy(logs + j, &y, sizeof(y));
  }
  for (; j < n; ++j) logs[j] = std::log(ratio[j]);
  for (j = 0; j < n - n % 4; ++j) {
    const double x = ratio[j];
    if (!(x >= 2.2250738585072014e-308 && x <= 1.7976931348623157e308)) logs[j] = std::log(x);
  }
}

// Register tiles of the two products that accumulate over a short index (the rank for T,
// a block's rows for W^T X): kTileRows x 16 floats in 2 x kTileRows 32-byte vectors (GCC
// vector extensions: one ymm each under AVX2 / AVX-512, two xmm in the portable unit), so
// each loaded operand serves kTileRows (or two) FMAs and the accumulators stay in registers.
// Written as `float acc[64]` under `omp simd`, GCC kept the accumulators in memory: a load
// and a store per FMA (Fashion-MNIST KL at rank 20, AMD EPYC Zen 3, 2 threads: the W sweep
// ran at 57 GFLOP/s, the H sweep at 39, against torch.mm's 177). Each entry is still summed
// in the same order (the rank, or the rows, one after another), so the results are those of
// the plain loops.
typedef float Vec8 __attribute__((vector_size(32)));
constexpr int kTileRows = 4;
constexpr i64 kTileCols = 16;
static_assert(kCols % kTileCols == 0 && kHCols % kTileCols == 0, "chunks of whole tiles");

inline Vec8 load8(const float* p) {
  Vec8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, Vec8 v) { std::memcpy(p, &v, sizeof(v)); }

// out[m * ldo + j] (+)= sum_{k < K} a[m * a_m + k * a_k] b[k * ldb + j] for m < M, j < 16:
// a sum of rank-1 updates with broadcast a entries, summed over k in order; kAdd starts from
// out (a reduction continued across calls), otherwise from 0. Always inlined: its callers'
// constant strides must reach the loop (a call with run-time strides and flag ran the KL
// iteration 17% slower).
template <int M, bool kAdd>
__attribute__((always_inline)) inline void rank1_tile(const float* a, i64 a_m, i64 a_k, i64 K,
                                                      const float* b, i64 ldb, float* out,
                                                      i64 ldo) {
  Vec8 acc[M][2] = {};
  if constexpr (kAdd) {
#pragma GCC unroll 4
    for (int i = 0; i < M; ++i) {
      acc[i][0] = load8(out + i * ldo);
      acc[i][1] = load8(out + i * ldo + 8);
    }
  }
  for (i64 k = 0; k < K; ++k) {
    const Vec8 b0 = load8(b + k * ldb), b1 = load8(b + k * ldb + 8);
#pragma GCC unroll 4
    for (int i = 0; i < M; ++i) {
      const float s = a[i * a_m + k * a_k];
      acc[i][0] += s * b0;
      acc[i][1] += s * b1;
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < M; ++i) {
    store8(out + i * ldo, acc[i][0]);
    store8(out + i * ldo + 8, acc[i][1]);
  }
}

// T (rows x cols, row stride kCols) = W[i0:i0+rows, :] H[:, j0:j0+cols]
void wh_tile(const Job& job, i64 i0, i64 rows, i64 j0, i64 cols, float* t) {
  const i64 r = job.r, n = job.n;
  const i64 full = cols - cols % kTileCols;
  const float* h = job.h + j0;
  i64 ii = 0;
  for (; ii + kTileRows <= rows; ii += kTileRows) {
    const float* w = job.w + (i0 + ii) * r;
    for (i64 jb = 0; jb < full; jb += kTileCols)
      rank1_tile<kTileRows, false>(w, r, 1, r, h + jb, n, t + ii * kCols + jb, kCols);
  }
  for (; ii < rows; ++ii) {
    const float* w = job.w + (i0 + ii) * r;
    for (i64 jb = 0; jb < full; jb += kTileCols)
      rank1_tile<1, false>(w, r, 1, r, h + jb, n, t + ii * kCols + jb, kCols);
  }
  for (ii = 0; ii < rows; ++ii) {  // the last cols % 16 columns
    float* tr = t + ii * kCols;
    const float* wr = job.w + (i0 + ii) * r;
    for (i64 j = full; j < cols; ++j) tr[j] = 0.0f;
    for (i64 k = 0; k < r; ++k)
      for (i64 j = full; j < cols; ++j) tr[j] += wr[k] * h[k * n + j];
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

inline float hsum8(Vec8 v) {
  float lanes[8];
  std::memcpy(lanes, &v, sizeof(v));
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
         ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// out[ii * r + kk] += sum_{j < cols8} x[ii * kCols + j] h[kk * n + j] for ii < MR, kk < MK:
// 8-lane partial sums in registers, each loaded x vector serving MK FMAs and each h vector MR.
template <int MR, int MK>
inline void xht_micro(const float* x, const float* h, i64 n, i64 cols8, float* out, i64 r) {
  Vec8 acc[MR][MK] = {};
  for (i64 j = 0; j < cols8; j += 8) {
    Vec8 hv[MK];
#pragma GCC unroll 4
    for (int kk = 0; kk < MK; ++kk) hv[kk] = load8(h + kk * n + j);
#pragma GCC unroll 4
    for (int ii = 0; ii < MR; ++ii) {
      const Vec8 xv = load8(x + ii * kCols + j);
#pragma GCC unroll 4
      for (int kk = 0; kk < MK; ++kk) acc[ii][kk] += xv * hv[kk];
    }
  }
#pragma GCC unroll 4
  for (int ii = 0; ii < MR; ++ii)
#pragma GCC unroll 4
    for (int kk = 0; kk < MK; ++kk) out[ii * r + kk] += hsum8(acc[ii][kk]);
}

// out[ii, k] += sum_j X[ii, j] H[k, j0 + j]  (X: rows x cols tile, out: rows x r), in register
// tiles of 2 rows x 4 ranks; the last cols % 8 columns and ranks in plain loops.
void times_ht(const Job& job, i64 rows, i64 j0, i64 cols, const float* x, float* out) {
  const i64 r = job.r, n = job.n;
  const float* h = job.h + j0;
  const i64 cols8 = cols - cols % 8;
  i64 ii = 0;
  for (; ii + 2 <= rows; ii += 2) {
    i64 k = 0;
    for (; k + 4 <= r; k += 4) xht_micro<2, 4>(x + ii * kCols, h + k * n, n, cols8, out + ii * r + k, r);
    for (; k < r; ++k) xht_micro<2, 1>(x + ii * kCols, h + k * n, n, cols8, out + ii * r + k, r);
  }
  for (; ii < rows; ++ii) {
    i64 k = 0;
    for (; k + 4 <= r; k += 4) xht_micro<1, 4>(x + ii * kCols, h + k * n, n, cols8, out + ii * r + k, r);
    for (; k < r; ++k) xht_micro<1, 1>(x + ii * kCols, h + k * n, n, cols8, out + ii * r + k, r);
  }
  for (ii = 0; ii < rows; ++ii)  // the last cols % 8 columns
    for (i64 k = 0; k < r; ++k) {
      float s = 0.0f;
      for (i64 j = cols8; j < cols; ++j) s += x[ii * kCols + j] * h[k * n + j];
      out[ii * r + k] += s;
    }
}

// out[k, j] += sum_ii W[i0 + ii, k] X[ii, j]  (out: r x kCols), kTileRows ranks by 16
// columns per register tile.
void wt_times(const Job& job, i64 i0, i64 rows, i64 cols, const float* x, float* out) {
  const i64 r = job.r;
  const float* w = job.w + i0 * r;
  const i64 full = cols - cols % kTileCols;
  i64 k = 0;
  for (; k + kTileRows <= r; k += kTileRows)
    for (i64 jb = 0; jb < full; jb += kTileCols)
      rank1_tile<kTileRows, true>(w + k, 1, r, rows, x + jb, kCols, out + k * kCols + jb, kCols);
  for (; k < r; ++k)
    for (i64 jb = 0; jb < full; jb += kTileCols)
      rank1_tile<1, true>(w + k, 1, r, rows, x + jb, kCols, out + k * kCols + jb, kCols);
  for (k = 0; k < r; ++k) {  // the last cols % 16 columns
    float* ok = out + k * kCols;
    for (i64 ii = 0; ii < rows; ++ii) {
      const float wk = w[ii * r + k];
      const float* xr = x + ii * kCols;
      for (i64 j = full; j < cols; ++j) ok[j] += wk * xr[j];
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
    sweep<Side::kW>();
    if (rules_.update_h) sweep<Side::kH>();
  }

  // sqrt(2 max(D_beta(V | W H), 0)), W H in double (nmf_beta.divergence).
  double error() {
    const i64 m = job_.m, n = job_.n, r = job_.r;
    const i64 blocks = (m + kRows - 1) / kRows;
    const double beta = rules_.beta;
    const Kind kind = rules_.kind;
#pragma omp parallel for schedule(static) num_threads(team_) if (team_ > 1)
    for (i64 bi = 0; bi < blocks; ++bi) {
      std::vector<double> wh(static_cast<std::size_t>(n)), ratio, logs;
      const bool logs_needed = kind == Kind::kKl || kind == Kind::kIs;
      if (logs_needed) {
        ratio.resize(static_cast<std::size_t>(n));
        logs.resize(static_cast<std::size_t>(n));
      }
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
        if (logs_needed) {  // x / c and its log for the kept entries (1 elsewhere: not read)
          for (i64 j = 0; j < n; ++j) {
            const double x = vr[j], y = wh[j];
            ratio[j] = x > kEps ? x / (y < kEps ? static_cast<double>(kEps) : y) : 1.0;
          }
          log_row(ratio.data(), logs.data(), n);
        }
        for (i64 j = 0; j < n; ++j) {
          const double x = vr[j], y = wh[j];
          if (kind == Kind::kFrobenius) {
            total += 0.5 * (x - y) * (x - y);
            continue;
          }
          const bool keep = x > kEps;
          const double c = y < kEps ? static_cast<double>(kEps) : y;
          if (kind == Kind::kKl) {
            total += y + (keep ? x * logs[j] - x : 0.0);
          } else if (kind == Kind::kIs) {
            total += keep ? (ratio[j] - logs[j]) - 1.0 : -1.0;
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
  // One tile of a sweep: T = W H over it (beta != 2), A = V o f(T) and B = g(T), then the
  // sweep's product of A into the numerators and of B into the denominators (beta not 1, 2).
  template <typename Product>
  void tile_step(Scratch& s, i64 i0, i64 rows, i64 j0, i64 cols, Product product) {
    if (rules_.has_tile()) wh_tile(job_, i0, rows, j0, cols, s.t.data());
    ratio_tiles(rules_, job_, i0, rows, j0, cols, s.t.data(), s.a.data(), s.b.data());
    product(s.a.data(), s.num.data());
    if (rules_.has_b()) product(s.b.data(), s.den.data());
  }

  enum class Side { kW, kH };

  // One half-iteration. W: parallel over blocks of kRows rows, each walking V's columns in
  // chunks of kCols; H: parallel over chunks of kHCols columns, each walking V's rows in
  // blocks of kRows. Each unit sums its numerators (and denominators) over its walk, then
  // updates its own rows of W or columns of H; no unit reads what another writes.
  template <Side S>
  void sweep() {
    const i64 m = job_.m, n = job_.n, r = job_.r;
    constexpr bool kW = S == Side::kW;
    prepare_denominators(kW);
    const i64 unit = kW ? kRows : kHCols, units = ((kW ? m : n) + unit - 1) / unit;
    const i64 walk = kW ? n : m, walk_step = kW ? kCols : kRows;
#pragma omp parallel for schedule(dynamic, 1) num_threads(team_) if (team_ > 1)
    for (i64 u = 0; u < units; ++u) {
      Scratch& s = scratch_[omp_get_thread_num()];
      const i64 begin = u * unit, len = std::min(unit, (kW ? m : n) - begin);
      s.clear(kW ? len * r : r * kCols);
      for (i64 q = 0; q < walk; q += walk_step) {
        const i64 qlen = std::min(walk_step, walk - q);
        if constexpr (kW) {
          tile_step(s, begin, len, q, qlen, [&](const float* x, float* out) {
            times_ht(job_, len, q, qlen, x, out);
          });
        } else {
          tile_step(s, q, qlen, begin, len, [&](const float* x, float* out) {
            wt_times(job_, q, qlen, len, x, out);
          });
        }
      }
      if constexpr (kW) {
        update_w_rows(s, begin, len);
      } else {
        update_h_columns(s, begin, len);
      }
    }
  }

  // The denominators' shared part: beta = 2, the Gram matrix of the other factor; beta = 1
  // (KL), its sums (H's row sums in double; W's column sums, zeros made 1 as scikit-learn's
  // W_sum[W_sum == 0] = 1).
  void prepare_denominators(bool w_side) {
    const i64 m = job_.m, n = job_.n, r = job_.r;
    if (rules_.kind == Kind::kFrobenius) {
      if (w_side) {
        gram(job_.h, r, n, /*rows=*/true);
      } else {
        gram(job_.w, m, r, /*rows=*/false);
      }
    }
    if (rules_.kind != Kind::kKl) return;
    std::vector<double> acc(static_cast<std::size_t>(r), 0.0);
    if (w_side) {
      for (i64 k = 0; k < r; ++k)
        for (i64 j = 0; j < n; ++j) acc[k] += job_.h[k * n + j];
    } else {
      for (i64 i = 0; i < m; ++i)
        for (i64 k = 0; k < r; ++k) acc[k] += job_.w[i * r + k];
    }
    for (i64 k = 0; k < r; ++k)
      sums_[k] = !w_side && acc[k] == 0 ? 1.0f : static_cast<float>(acc[k]);
  }

  // Rows i0 .. i0 + rows of W from the block's sums (num, den: rows x r).
  void update_w_rows(Scratch& s, i64 i0, i64 rows) {
    const i64 r = job_.r;
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

  // Columns j0 .. j0 + cols of H from the chunk's sums (num, den: r x kCols).
  void update_h_columns(Scratch& s, i64 j0, i64 cols) {
    const i64 n = job_.n, r = job_.r;
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
