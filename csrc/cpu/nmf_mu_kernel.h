// The generic CPU NMF solver, compiled once per ISA: nmf_mu_portable.cpp (16-byte vectors),
// nmf_mu_avx2.cpp (32) and nmf_mu_avx512.cpp (64) define ONG_NMF_NS (a per-ISA namespace, so
// no inline function compiled with AVX-512 can be the copy the linker keeps for another ISA),
// ONG_NMF_VBYTES (vector width) and ONG_NMF_ACC (vector accumulators a tile may keep in
// registers: 24 of AVX-512's 32 zmm, 12 of the 16 ymm/xmm), then include this file.
//
// Layout per matrix: W as m x rp and H^T as n x rp, row-major, rp = r rounded up to the
// vector width; the pad columns stay exactly 0 (numerator 0, denominator 0 -> eps, 0*0/eps=0).
// Then both MU numerators are rank-1 updates with broadcast V elements:
//   V H^T: for a tile of MR rows i, acc[ii][:] += V[i+ii, j] * Ht[j, :]  over j  (rows_tile)
//   W^T V: for a tile of NR columns j, acc[jj][:] += V[i, j+jj] * W[i, :]  over i (cols_tile)
// and so are the r x r Gram products (X^T X = cols_tile with A = B = X) and the denominators
// W (H H^T), H^T (W^T W) (rows_tile with K = r). Each sweep works on a fixed block of rows
// (W) or columns (H) and ends in the block's epilogue: denominator, the MU update with the
// eps rule, and the block's partial Gram product of the new factor rows.
//
// Threads: the block decomposition never depends on the thread count and the partial Gram
// products (and the error terms) are summed in block order, so a matrix solved by one thread
// and one solved by a team of threads give bitwise identical factors.
//
// Convergence error (check iterations only), in float64 without a pass over V:
//   ||V - W H||^2 = ||V||^2 - 2 sum((W^T V) o H) + sum((W^T W) o (H H^T)),
// with W^T V accumulated in double on check iterations (float accumulation would cancel
// catastrophically for near-exact fits) and the Gram products of the new factors in double.

#ifndef ONG_NMF_NS
#error "define ONG_NMF_NS, ONG_NMF_VBYTES and ONG_NMF_ACC before including nmf_mu_kernel.h"
#endif

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <vector>

#include "ong_nmf.h"

namespace ong {
namespace nmf {
namespace ONG_NMF_NS {
namespace {

using i64 = std::int64_t;
constexpr int kVBytes = ONG_NMF_VBYTES;
constexpr int kAcc = ONG_NMF_ACC;
constexpr int kFloatLanes = kVBytes / 4;
// scikit-learn's EPSILON (np.finfo(np.float32).eps) = nmf_plan.EPS.
constexpr float kEps = 1.1920928955078125e-07f;
constexpr int kCheckEvery = 10;  // nmf_plan.CHECK_EVERY
// Rows (W sweep) / columns (H sweep) per block: a multiple of every tile height (24, 12, 8,
// 6, 4, 3) and large enough that the partial Gram products (rp x rp per block) stay a small
// share of the sweep; raised to rp for very large ranks so they stay O((m + n) r) memory.
constexpr i64 kBlock = 96;
// Rows of V ahead that cols_tile prefetches, per ISA: its column strips jump one row (n
// floats) per step, a stride the hardware prefetchers do not follow beyond 2 KiB. With
// AVX-512 a strip also gets its last line prefetched: at 12 columns (the 32-column sketch) 3
// in 4 strips cross a line, and the second line came from memory unprefetched. Measured on
// AMD Zen 4, 2 threads (benchmarks/RESULTS.md, issue 28), against 8 rows and the first line:
// - AVX-512, 32 rows and both lines: the sketch's V^T X at 32 columns 164-169 -> 177-193
//   GFLOP/s (4096 x 4096, 11008 x 4096), 139-141 -> 174-183 (4096 x 11008); 64 rows fell
//   to 146-155 (the next row block's rows);
// - AVX2, 16 rows: one MU iteration of the Llama layer at rank 16 89.5-91.1 -> 82.7-83.3
//   ms, BERT-base at 16 31.0-33.0 -> 30.0-30.3 (32 rows: 87.5; the second line cost 10%
//   on 4096 x 11008's V^T X);
// - portable: 16 rows cost 2-4% (MU iteration), so it keeps 8.
constexpr i64 kPrefetchRows = ONG_NMF_PREFETCH_ROWS;
constexpr bool kPrefetchLastLine = ONG_NMF_PREFETCH_LAST_LINE;
// W^T V on a tall and wide V (m >= kPackMinRows, n >= kPackMinCols) packs panels of
// kPanelRows x block of V first: going down a column strip of thousands of rows with a row
// stride of several KiB maps the rows onto few cache sets, and the strip falls out of L2
// (4096 x 4096 at rank 64: 72 GFLOP/s on one core unpacked, 130 packed). Shorter strips stay
// in L2 and packing only costs (512 x 4608 at rank 16: 133 GFLOP/s unpacked, 101 packed).
// The packed panel is one block of rows by one block of columns (96 x 96 floats, 36 KiB).
constexpr i64 kPackMinRows = 1024;
// w_block fuses W^T V into the W sweep (V read once per iteration) up to this padded rank.
// One core, CPU time, two alternating runs each: 512 x 4608 at rank 16: 122, 118 GFLOP/s
// fused against 97, 114 unfused; at rank 64: 108, 99 fused against 106, 108 unfused (the
// n x rp partial sums it reloads per row block outweigh the saved V traffic there).
constexpr i64 kFuseMaxRank = 32;
constexpr i64 kPackMinCols = 512;

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(kVBytes)));
  static constexpr int lanes = kVBytes / 4;
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(kVBytes)));
  static constexpr int lanes = kVBytes / 8;
};

template <typename T>
inline typename VecOf<T>::type vload(const T* p) {
  typename VecOf<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void vstore(T* p, typename VecOf<T>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

// ----------------------------------------------------------------------------- tiles
// Every loop over a tile's registers is unrolled (GCC left the 24-column loop rolled, with
// the accumulators on the stack: 74 GFLOP/s on one core at rank 16, see RESULTS.md).
#define UNROLL _Pragma("GCC unroll 32")

// out[jj * ldo + c] (+)= sum_{k < K} A[k * lda + jj] * B[k * ldb + c], jj < NR, c < NV
// vectors; `add` accumulates onto out (a reduction split into panels).
template <typename T, int NV, int NR>
inline void cols_tile(const float* A, i64 lda, i64 K, const T* B, i64 ldb, T* out, i64 ldo,
                      bool add) {
  using V = typename VecOf<T>::type;
  constexpr int L = VecOf<T>::lanes;
  V acc[NR][NV];
  UNROLL for (int jj = 0; jj < NR; ++jj)
    UNROLL for (int c = 0; c < NV; ++c) acc[jj][c] = add ? vload<T>(out + jj * ldo + c * L) : V{};
  for (i64 k = 0; k < K; ++k) {
    const float* a = A + k * lda;
    __builtin_prefetch(a + kPrefetchRows * lda);
    if (NR > 16) __builtin_prefetch(a + kPrefetchRows * lda + 16);
    if (kPrefetchLastLine && NR > 1) __builtin_prefetch(a + kPrefetchRows * lda + NR - 1);
    const T* b = B + k * ldb;
    V bv[NV];
    UNROLL for (int c = 0; c < NV; ++c) bv[c] = vload<T>(b + c * L);
    UNROLL for (int jj = 0; jj < NR; ++jj) {
      const T s = static_cast<T>(a[jj]);
      UNROLL for (int c = 0; c < NV; ++c) acc[jj][c] += s * bv[c];
    }
  }
  UNROLL for (int jj = 0; jj < NR; ++jj)
    UNROLL for (int c = 0; c < NV; ++c) {
      vstore<T>(out + jj * ldo + c * L, acc[jj][c]);
    }
}

// out[ii * ldo + c] = sum_{k < K} A[ii * lda + k] * B[k * ldb + c], ii < MR, c < NV vectors.
template <int NV, int MR>
inline void rows_tile(const float* A, i64 lda, i64 K, const float* B, i64 ldb, float* out,
                      i64 ldo) {
  using V = VecOf<float>::type;
  constexpr int L = kFloatLanes;
  V acc[MR][NV];
  const float* a[MR];
  UNROLL for (int ii = 0; ii < MR; ++ii) {
    a[ii] = A + ii * lda;
    UNROLL for (int c = 0; c < NV; ++c) acc[ii][c] = V{};
  }
  for (i64 k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    V bv[NV];
    UNROLL for (int c = 0; c < NV; ++c) bv[c] = vload<float>(b + c * L);
    UNROLL for (int ii = 0; ii < MR; ++ii) {
      const float s = a[ii][k];
      UNROLL for (int c = 0; c < NV; ++c) acc[ii][c] += s * bv[c];
    }
  }
  UNROLL for (int ii = 0; ii < MR; ++ii)
    UNROLL for (int c = 0; c < NV; ++c) {
      vstore<float>(out + ii * ldo + c * L, acc[ii][c]);
    }
}

// Tile heights: kAcc accumulators at most; rows_tile keeps one pointer per row, capped at 12
// rows (512 x 4608 at rank 16, one core, CPU time: 104-110 GFLOP/s with 8 rows, 119-125 with
// 12; GCC keeps the 12 row pointers in general registers).
template <int NV>
constexpr int cols_height() {
  return kAcc / NV;
}
template <int NV>
constexpr int rows_height() {
  return kAcc / NV < 12 ? kAcc / NV : 12;
}

// The ncols output rows of one chunk of NV vectors: full tiles, then tails of 4, 2, 1.
template <typename T, int NV>
void cols_chunk(const float* A, i64 lda, i64 K, i64 ncols, const T* B, i64 ldb, T* out,
                i64 ldo, bool add) {
  constexpr int H = cols_height<NV>();
  i64 j = 0;
  for (; j + H <= ncols; j += H) cols_tile<T, NV, H>(A + j, lda, K, B, ldb, out + j * ldo, ldo, add);
  if (H > 4)
    for (; j + 4 <= ncols; j += 4) cols_tile<T, NV, 4>(A + j, lda, K, B, ldb, out + j * ldo, ldo, add);
  for (; j + 2 <= ncols; j += 2) cols_tile<T, NV, 2>(A + j, lda, K, B, ldb, out + j * ldo, ldo, add);
  for (; j < ncols; ++j) cols_tile<T, NV, 1>(A + j, lda, K, B, ldb, out + j * ldo, ldo, add);
}

template <int NV>
void rows_chunk(const float* A, i64 lda, i64 K, i64 nrows, const float* B, i64 ldb, float* out,
                i64 ldo) {
  constexpr int H = rows_height<NV>();
  i64 i = 0;
  for (; i + H <= nrows; i += H)
    rows_tile<NV, H>(A + i * lda, lda, K, B, ldb, out + i * ldo, ldo);
  if (H > 4)
    for (; i + 4 <= nrows; i += 4)
      rows_tile<NV, 4>(A + i * lda, lda, K, B, ldb, out + i * ldo, ldo);
  for (; i + 2 <= nrows; i += 2) rows_tile<NV, 2>(A + i * lda, lda, K, B, ldb, out + i * ldo, ldo);
  for (; i < nrows; ++i) rows_tile<NV, 1>(A + i * lda, lda, K, B, ldb, out + i * ldo, ldo);
}

// out (ncols x width) = A^T-ish product of cols_tile over the full width, in chunks of up to
// 4 vectors (more would not leave registers for the accumulators).
template <typename T>
void cols_product(const float* A, i64 lda, i64 K, i64 ncols, const T* B, i64 ldb, i64 width,
                  T* out, i64 ldo, bool add = false) {
  constexpr int L = VecOf<T>::lanes;
  const i64 nvec = width / L;
  for (i64 c0 = 0; c0 < nvec; c0 += 4) {
    const T* b = B + c0 * L;
    T* o = out + c0 * L;
    switch (std::min<i64>(4, nvec - c0)) {
      case 1: cols_chunk<T, 1>(A, lda, K, ncols, b, ldb, o, ldo, add); break;
      case 2: cols_chunk<T, 2>(A, lda, K, ncols, b, ldb, o, ldo, add); break;
      case 3: cols_chunk<T, 3>(A, lda, K, ncols, b, ldb, o, ldo, add); break;
      default: cols_chunk<T, 4>(A, lda, K, ncols, b, ldb, o, ldo, add); break;
    }
  }
}

void rows_product(const float* A, i64 lda, i64 K, i64 nrows, const float* B, i64 ldb, i64 width,
                  float* out, i64 ldo) {
  constexpr int L = kFloatLanes;
  const i64 nvec = width / L;
  for (i64 c0 = 0; c0 < nvec; c0 += 4) {
    const float* b = B + c0 * L;
    float* o = out + c0 * L;
    switch (std::min<i64>(4, nvec - c0)) {
      case 1: rows_chunk<1>(A, lda, K, nrows, b, ldb, o, ldo); break;
      case 2: rows_chunk<2>(A, lda, K, nrows, b, ldb, o, ldo); break;
      case 3: rows_chunk<3>(A, lda, K, nrows, b, ldb, o, ldo); break;
      default: rows_chunk<4>(A, lda, K, nrows, b, ldb, o, ldo); break;
    }
  }
}

// x = x * (num / den), den exactly 0 -> eps (scikit-learn's rule, the reference's order).
inline void mu_update_row(float* x, const float* num, const float* den, i64 width) {
  using V = VecOf<float>::type;
  const V eps = V{} + kEps;
  const V zero = V{};
  for (i64 c = 0; c < width; c += kFloatLanes) {
    V d = vload<float>(den + c);
    d = d == zero ? eps : d;
    vstore<float>(x + c, vload<float>(x + c) * (vload<float>(num + c) / d));
  }
}

// ----------------------------------------------------------------------------- memory

// A growable 64-byte aligned buffer; null data after a failed allocation.
struct Buffer {
  void* data = nullptr;
  std::size_t size = 0;
  Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { std::free(data); }
  bool reserve(std::size_t bytes) {
    if (bytes <= size && data != nullptr) return true;
    std::free(data);
    size = (bytes + 63) / 64 * 64;
    data = std::aligned_alloc(64, size == 0 ? 64 : size);
    if (data == nullptr) size = 0;
    return data != nullptr;
  }
  void release() {
    std::free(data);
    data = nullptr;
    size = 0;
  }
};

// Carves 64-byte aligned arrays out of one buffer: sized on a first pass (base == null).
struct Carver {
  char* base;
  std::size_t offset = 0;
  template <typename T>
  T* take(i64 count) {
    T* p = base == nullptr ? nullptr : reinterpret_cast<T*>(base + offset);
    offset += (static_cast<std::size_t>(count) * sizeof(T) + 63) / 64 * 64;
    return p;
  }
};

inline i64 round_up(i64 x, i64 to) { return (x + to - 1) / to * to; }
inline i64 padded_rank(i64 r) { return round_up(r, kFloatLanes); }
inline i64 block_size(i64 rp) { return std::max(kBlock, round_up(rp, 24)); }

// Per-thread scratch of a block sweep: numerators (double on check iterations), denominators.
struct Scratch {
  Buffer buf;
  double* num_d = nullptr;
  float* num = nullptr;
  float* den = nullptr;
  float* panel = nullptr;  // block x block of V, packed (tall wide matrices)
  bool reserve(i64 rp) {
    const i64 rows = block_size(rp);
    Carver sizing{nullptr};
    sizing.take<double>(rows * rp);
    sizing.take<float>(rows * rp);
    sizing.take<float>(rows * rp);
    sizing.take<float>(rows * rows);
    if (!buf.reserve(sizing.offset)) return false;
    Carver c{static_cast<char*>(buf.data)};
    num_d = c.take<double>(rows * rp);
    num = c.take<float>(rows * rp);
    den = c.take<float>(rows * rp);
    panel = c.take<float>(rows * rows);
    return true;
  }
};

// ----------------------------------------------------------------------------- conversion

inline float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  const std::uint32_t mant = h & 0x3ffu;
  std::uint32_t bits;
  if (exp == 0) {
    const float f = static_cast<float>(mant) * 5.9604644775390625e-08f;  // mant * 2^-24
    return sign ? -f : f;
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float bfloat16_to_float(std::uint16_t b) {
  const std::uint32_t bits = static_cast<std::uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Rows [i0, i1) of V in float32 (the op casts float64 to float32 as the reference does).
void convert_rows(const void* v, DType dtype, i64 n, i64 i0, i64 i1, float* out) {
  const i64 begin = i0 * n, end = i1 * n;
  switch (dtype) {
    case DType::kFloat16: {
      const auto* p = static_cast<const std::uint16_t*>(v);
      for (i64 k = begin; k < end; ++k) out[k] = half_to_float(p[k]);
      break;
    }
    case DType::kBFloat16: {
      const auto* p = static_cast<const std::uint16_t*>(v);
      for (i64 k = begin; k < end; ++k) out[k] = bfloat16_to_float(p[k]);
      break;
    }
    case DType::kFloat64: {
      const auto* p = static_cast<const double*>(v);
      for (i64 k = begin; k < end; ++k) out[k] = static_cast<float>(p[k]);
      break;
    }
    case DType::kFloat32: break;
  }
}

// ----------------------------------------------------------------------------- teams

// A matrix is solved either by one thread (coop = false: every loop runs here) or by the
// whole OpenMP team (coop = true: every thread calls the solver; blocks are shared out by an
// orphaned `omp for`, reductions run in `omp single`). The block loop bodies are the same
// code either way, which is what makes 1- and N-thread results bitwise equal.
struct Team {
  bool coop;
  template <class F>
  void for_blocks(i64 count, F&& f) const {
    if (coop) {
#pragma omp for schedule(dynamic, 1)
      for (i64 b = 0; b < count; ++b) f(b);
    } else {
      for (i64 b = 0; b < count; ++b) f(b);
    }
  }
  template <class F>
  void single(F&& f) const {
    if (coop) {
#pragma omp single
      f();
    } else {
      f();
    }
  }
};

// ----------------------------------------------------------------------------- one matrix

// The blocks' partial Gram products (max(nbw, nbh) blocks of rp x rp): float64 on a pass that
// checks the error, float32 otherwise, in one buffer sized for float64. One type, so no call
// site picks the precision by casting the buffer.
struct Partials {
  void* data = nullptr;
  i64 stride = 0;  // rp * rp
  template <typename T>
  T* block(i64 b) const {
    static_assert(sizeof(T) <= sizeof(double), "the buffer is sized for float64");
    return static_cast<T*>(data) + b * stride;
  }
};

// What a sweep block computes: kUpdate the multiplicative update (float32 Gram partials);
// kCheck the update and the float64 terms of the error check (float64 Gram partials, the H
// sweep's cross term); kError only the H sweep's cross term of the current H (the initial
// error: no update).
enum class Pass { kUpdate, kCheck, kError };

struct Matrix {
  Job job;
  i64 rp = 0, block = 0, nbw = 0, nbh = 0;
  bool checks = false;
  bool fused = false;  // solved by one thread: numH buffers exist
  // One thread walks the W blocks in order, so it can fuse the H numerator (w_block).
  bool fuse_wtv = false;  // solo and rp <= kFuseMaxRank
  Buffer buf;
  Buffer vbuf;           // V in float32 when V is a half type or float64
  const float* V = nullptr;
  float *W = nullptr, *Ht = nullptr;       // m x rp, n x rp
  double *Wd = nullptr, *Htd = nullptr;    // their float64 copies (check iterations)
  float* numH = nullptr;                   // n x rp: fused W^T V (one-thread solves)
  double* numHd = nullptr;                 // the same in float64 (check iterations)
  float *WtW = nullptr, *HHt = nullptr;    // rp x rp
  double *WtWd = nullptr, *HHtd = nullptr;
  Partials partials;
  double* terms = nullptr;                 // max(nbw, nbh): ||V||^2 or cross-term partials
  double norm_v2 = 0, initial = 0, previous = 0;
  bool stopped = false;

  // Sizes the layout; allocates it unless `dry`. Returns the bytes (0 on failure).
  std::size_t layout(bool dry) {
    const i64 m = job.m, n = job.n;
    const i64 nb = std::max(nbw, nbh);
    Carver c{dry ? nullptr : static_cast<char*>(buf.data)};
    W = c.take<float>(m * rp);
    Ht = c.take<float>(n * rp);
    WtW = c.take<float>(rp * rp);
    HHt = c.take<float>(rp * rp);
    partials = {c.take<double>(nb * rp * rp), rp * rp};
    terms = c.take<double>(nb);
    numH = fused ? c.take<float>(n * rp) : nullptr;
    numHd = fused && checks ? c.take<double>(n * rp) : nullptr;
    if (checks) {
      Wd = c.take<double>(m * rp);
      Htd = c.take<double>(n * rp);
      WtWd = c.take<double>(rp * rp);
      HHtd = c.take<double>(rp * rp);
    }
    return c.offset;
  }

  bool allocate(const Job& j, bool with_checks, bool solo) {
    job = j;
    checks = with_checks;
    fused = solo;
    rp = padded_rank(j.r);
    fuse_wtv = solo && rp <= kFuseMaxRank;
    block = block_size(rp);
    nbw = (j.m + block - 1) / block;
    nbh = (j.n + block - 1) / block;
    if (!buf.reserve(layout(true))) return false;
    layout(false);
    if (j.dtype == DType::kFloat32) {
      V = static_cast<const float*>(j.v);
    } else {
      if (!vbuf.reserve(static_cast<std::size_t>(j.m * j.n) * sizeof(float))) return false;
      V = static_cast<const float*>(vbuf.data);
    }
    return true;
  }
};

// Sum of `count` partial r x rp products in block order into out (rows >= r stay 0).
template <typename T, typename Out>
void sum_partials(const T* parts, i64 count, i64 r, i64 rp, Out* out) {
  std::fill(out, out + rp * rp, Out{});
  for (i64 b = 0; b < count; ++b) {
    const T* p = parts + b * rp * rp;
    for (i64 k = 0; k < r * rp; ++k) out[k] += p[k];
  }
}

// Partial Gram product of factor rows [x0, x0 + rows): X^T X over those rows.
template <typename T>
void gram_block(const float* X, const T* Xb, i64 rows, i64 r, i64 rp, T* out) {
  cols_product<T>(X, rp, rows, r, Xb, rp, rp, out, rp);
}

// Block b's partial Gram product of the factor rows [x0, x0 + rows) of X (padded rows of rp):
// in float64 (`exact`) from the rows' float64 copy, written into Xd here (the error terms
// read it), else in float32.
void partial_gram(Matrix& s, float* X, double* Xd, i64 x0, i64 rows, i64 b, bool exact) {
  const i64 rp = s.rp;
  const float* rows_f = X + x0 * rp;
  if (exact) {
    double* rows_d = Xd + x0 * rp;
    for (i64 k = 0; k < rows * rp; ++k) rows_d[k] = rows_f[k];
    gram_block<double>(rows_f, rows_d, rows, s.job.r, rp, s.partials.block<double>(b));
  } else {
    gram_block<float>(rows_f, rows_f, rows, s.job.r, rp, s.partials.block<float>(b));
  }
}

// The Gram product from the first `count` block partials: float64 into gd and its float32
// copy into g when `exact`, else float32 into g.
void sum_gram(const Matrix& s, i64 count, bool exact, float* g, double* gd) {
  if (exact) {
    sum_partials(s.partials.block<double>(0), count, s.job.r, s.rp, gd);
    for (i64 k = 0; k < s.rp * s.rp; ++k) g[k] = static_cast<float>(gd[k]);
  } else {
    sum_partials(s.partials.block<float>(0), count, s.job.r, s.rp, g);
  }
}

template <typename T>
inline double dot_d(const T* a, const float* b, i64 count) {
  double s = 0;
  for (i64 k = 0; k < count; ++k) s += static_cast<double>(a[k]) * static_cast<double>(b[k]);
  return s;
}

// W sweep, block b (kUpdate or kCheck): W <- W * (V H^T) / (W (H H^T)) on its rows, then
// their partial Gram. s.fuse_wtv (a matrix solved by one thread, blocks in order): also adds
// the block's share of the H numerator, W_new^T V over its rows, to s.numH (s.numHd on check
// iterations) while V's rows are still in cache: V is then read once per iteration instead of
// twice (rank 16 is bound by streaming V: 2 flops per float per sweep and rank). The sum runs
// over row blocks in order, exactly as wtv's does, so fused and team solves agree bitwise.
void w_block(Matrix& s, Scratch& t, i64 b, Pass pass) {
  const i64 n = s.job.n, r = s.job.r, rp = s.rp;
  const i64 i0 = b * s.block, rows = std::min(s.block, s.job.m - i0);
  const bool check = pass == Pass::kCheck;
  float* W = s.W + i0 * rp;
  rows_product(s.V + i0 * n, n, n, rows, s.Ht, rp, rp, t.num, rp);
  rows_product(W, rp, r, rows, s.HHt, rp, rp, t.den, rp);
  for (i64 ii = 0; ii < rows; ++ii) mu_update_row(W + ii * rp, t.num + ii * rp, t.den + ii * rp, rp);
  partial_gram(s, s.W, s.Wd, i0, rows, b, check);
  if (!s.fuse_wtv) return;
  const float* V = s.V + i0 * n;
  if (check) {
    cols_product<double>(V, n, rows, n, s.Wd + i0 * rp, rp, rp, s.numHd, rp, b > 0);
  } else {
    cols_product<float>(V, n, rows, n, W, rp, rp, s.numH, rp, b > 0);
  }
}

// out (cols x rp) = (W^T V)^T for columns [j0, j0 + cols): W^T V's rows as H^T's.
template <typename T>
void wtv(const Matrix& s, Scratch& t, i64 j0, i64 cols, const T* W, T* out) {
  const i64 m = s.job.m, n = s.job.n, rp = s.rp;
  // Summed over row blocks in order (w_block's fused order): stores and reloads of the
  // partial sums are exact, so the result is bitwise the fused one.
  const bool pack = m >= kPackMinRows && n >= kPackMinCols;
  for (i64 i0 = 0; i0 < m; i0 += s.block) {
    const i64 rows = std::min(s.block, m - i0);
    if (!pack) {
      cols_product<T>(s.V + i0 * n + j0, n, rows, cols, W + i0 * rp, rp, rp, out, rp, i0 > 0);
      continue;
    }
    for (i64 ii = 0; ii < rows; ++ii)
      std::memcpy(t.panel + ii * cols, s.V + (i0 + ii) * n + j0, cols * sizeof(float));
    cols_product<T>(t.panel, cols, rows, cols, W + i0 * rp, rp, rp, out, rp, i0 > 0);
  }
}

// H sweep, block b: H <- H * (W^T V) / ((W^T W) H) on its columns (rows of Ht), then their
// partial Gram. On check passes W^T V is accumulated in double and the block's cross term
// sum((W^T V) o H_new) recorded; kError records the cross term of the current H without
// updating (the initial error: W^T V is not fused yet).
void h_block(Matrix& s, Scratch& t, i64 b, Pass pass) {
  const i64 n = s.job.n, r = s.job.r, rp = s.rp;
  const i64 j0 = b * s.block, cols = std::min(s.block, n - j0);
  const bool check = pass != Pass::kUpdate, update = pass != Pass::kError;
  const bool fused = s.fuse_wtv && update;
  float* Ht = s.Ht + j0 * rp;
  const float* num = t.num;
  const double* num_d = t.num_d;
  if (check) {
    if (fused) {
      num_d = s.numHd + j0 * rp;
    } else {
      wtv(s, t, j0, cols, s.Wd, t.num_d);
    }
    for (i64 k = 0; k < cols * rp; ++k) t.num[k] = static_cast<float>(num_d[k]);
  } else if (fused) {
    num = s.numH + j0 * rp;
  } else {
    wtv(s, t, j0, cols, s.W, t.num);
  }
  if (update) {
    rows_product(Ht, rp, r, cols, s.WtW, rp, rp, t.den, rp);
    for (i64 jj = 0; jj < cols; ++jj)
      mu_update_row(Ht + jj * rp, num + jj * rp, t.den + jj * rp, rp);
  }
  if (check) {
    double cross = 0;
    for (i64 jj = 0; jj < cols; ++jj) cross += dot_d(num_d + jj * rp, Ht + jj * rp, r);
    s.terms[b] = cross;
  }
  if (update) partial_gram(s, s.Ht, s.Htd, j0, cols, b, check);
}

// ||V - W H||_F from the current double Gram products and the cross-term partials.
double trace_error(const Matrix& s) {
  double cross = 0, gram = 0;
  for (i64 b = 0; b < s.nbh; ++b) cross += s.terms[b];
  for (i64 k = 0; k < s.job.r; ++k)
    for (i64 c = 0; c < s.job.r; ++c) gram += s.WtWd[k * s.rp + c] * s.HHtd[k * s.rp + c];
  const double e2 = s.norm_v2 - 2.0 * cross + gram;
  return e2 > 0 ? std::sqrt(e2) : 0.0;
}

// Loads the factors into the padded layout (and V into float32), computes H H^T, and on
// checking solves the initial error. Called by every thread of the team.
void prepare(Matrix& s, Scratch& t, const Team& team) {
  const i64 m = s.job.m, n = s.job.n, r = s.job.r, rp = s.rp;
  team.for_blocks(s.nbw, [&](i64 b) {
    const i64 i0 = b * s.block, i1 = std::min(m, i0 + s.block);
    if (s.job.dtype != DType::kFloat32)
      convert_rows(s.job.v, s.job.dtype, n, i0, i1, const_cast<float*>(s.V));
    for (i64 i = i0; i < i1; ++i) {
      std::memcpy(s.W + i * rp, s.job.w + i * r, r * sizeof(float));
      std::fill(s.W + i * rp + r, s.W + (i + 1) * rp, 0.0f);
    }
    if (s.checks) {
      double sum = 0;
      for (i64 k = i0 * n; k < i1 * n; ++k) sum += static_cast<double>(s.V[k]) * s.V[k];
      s.terms[b] = sum;
      partial_gram(s, s.W, s.Wd, i0, i1 - i0, b, true);
    }
  });
  if (s.checks) {
    team.single([&] {
      s.norm_v2 = 0;
      for (i64 b = 0; b < s.nbw; ++b) s.norm_v2 += s.terms[b];
      sum_gram(s, s.nbw, true, s.WtW, s.WtWd);
    });
  }
  team.for_blocks(s.nbh, [&](i64 b) {
    const i64 j0 = b * s.block, j1 = std::min(n, j0 + s.block);
    for (i64 j = j0; j < j1; ++j) {
      float* row = s.Ht + j * rp;
      for (i64 k = 0; k < r; ++k) row[k] = s.job.h[k * n + j];
      std::fill(row + r, row + rp, 0.0f);
    }
    partial_gram(s, s.Ht, s.Htd, j0, j1 - j0, b, s.checks);
  });
  team.single([&] { sum_gram(s, s.nbh, s.checks, s.HHt, s.HHtd); });
  if (s.checks) {
    team.for_blocks(s.nbh, [&](i64 b) { h_block(s, t, b, Pass::kError); });
    team.single([&] {
      s.initial = s.previous = trace_error(s);
      s.stopped = false;
    });
  }
}

void write_back(Matrix& s, const Team& team) {
  const i64 m = s.job.m, n = s.job.n, r = s.job.r, rp = s.rp;
  team.for_blocks(s.nbw, [&](i64 b) {
    for (i64 i = b * s.block; i < std::min(m, (b + 1) * s.block); ++i)
      std::memcpy(s.job.w + i * r, s.W + i * rp, r * sizeof(float));
  });
  team.for_blocks(s.nbh, [&](i64 b) {
    const i64 j0 = b * s.block, j1 = std::min(n, j0 + s.block);
    for (i64 k = 0; k < r; ++k)
      for (i64 j = j0; j < j1; ++j) s.job.h[k * n + j] = s.Ht[j * rp + k];
  });
}

// Runs the iterations with scikit-learn's per-matrix stopping rule (nmf_plan.stop_rule).
void solve(Matrix& s, Scratch& t, const Team& team, i64 max_iter, double tol) {
  prepare(s, t, team);
  i64 done = max_iter;
  for (i64 it = 1; it <= max_iter; ++it) {
    const bool check = s.checks && it % kCheckEvery == 0 && it < max_iter;
    const Pass pass = check ? Pass::kCheck : Pass::kUpdate;
    team.for_blocks(s.nbw, [&](i64 b) { w_block(s, t, b, pass); });
    team.single([&] { sum_gram(s, s.nbw, check, s.WtW, s.WtWd); });
    team.for_blocks(s.nbh, [&](i64 b) { h_block(s, t, b, pass); });
    team.single([&] {
      sum_gram(s, s.nbh, check, s.HHt, s.HHtd);
      if (check) {
        const double error = trace_error(s);
        s.stopped = s.initial <= 0 || (s.previous - error) / s.initial < tol;
        s.previous = error;
      }
    });
    // Every thread reads `stopped` after the barrier that ends the single above.
    if (check && s.stopped) {
      done = it;
      break;
    }
  }
  write_back(s, team);
  team.single([&] { *s.job.n_iter = done; });
}

i64 work_of(const Job& j) {
  const i64 rp = padded_rank(j.r);
  return j.m * j.n * rp + (j.m + j.n) * rp * rp;
}

}  // namespace
}  // namespace ONG_NMF_NS
#undef UNROLL

// The batch: matrices that are a large share of the work are solved one after another by
// the whole team (rows/columns blocks shared out); the rest one per thread, largest first.
bool ONG_NMF_SOLVE_BATCH(const Job* jobs, std::int64_t n_jobs, std::int64_t max_iter,
                         double tol, int num_threads) {
  using namespace ONG_NMF_NS;
  const int threads = std::max(1, num_threads);
  // nmf_plan.check_iterations: 10, 20, ... below max_iter; none when tol = 0.
  const bool checks = tol > 0 && max_iter > kCheckEvery;
  std::vector<i64> order(static_cast<std::size_t>(n_jobs));
  std::iota(order.begin(), order.end(), i64{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](i64 a, i64 b) { return work_of(jobs[a]) > work_of(jobs[b]); });
  i64 total = 0, max_rp = 0;
  for (i64 i = 0; i < n_jobs; ++i) {
    total += work_of(jobs[i]);
    max_rp = std::max(max_rp, padded_rank(jobs[i].r));
  }
  // Cooperative when a matrix is more than half of one thread's fair share: one thread alone
  // on it would finish last (largest-first scheduling cannot balance a job that size).
  std::vector<i64> team_jobs, own_jobs;
  for (i64 i : order) {
    const bool big = threads > 1 && work_of(jobs[i]) * 2 * threads > total;
    (big ? team_jobs : own_jobs).push_back(i);
  }
  int failed = 0;  // shared: any allocation failed (the call then reports it)
  Matrix shared;
#pragma omp parallel num_threads(threads)
  {
    Scratch scratch;
    if (!scratch.reserve(max_rp)) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp barrier
    const Team team{true};
    for (i64 i : team_jobs) {
      // Allocated by one thread; every thread reads the outcome after the single's barrier,
      // so all of them take the same branch (the solve's worksharing needs the whole team).
      team.single([&] {
        if (!failed && !shared.allocate(jobs[i], checks, false)) failed = 1;
      });
      if (!failed) solve(shared, scratch, team, max_iter, tol);
#pragma omp barrier
    }
    team.single([&] {
      shared.buf.release();
      shared.vbuf.release();
    });
    Matrix own;
    const Team alone{false};
#pragma omp for schedule(dynamic, 1)
    for (std::size_t k = 0; k < own_jobs.size(); ++k) {
      int stop;
#pragma omp atomic read
      stop = failed;
      if (stop) continue;
      if (!own.allocate(jobs[own_jobs[k]], checks, true)) {
#pragma omp atomic write
        failed = 1;
        continue;
      }
      solve(own, scratch, alone, max_iter, tol);
    }
  }
  return !failed;
}

// The randomized SVD's sketch products (ong_kernels/nmf_init.py) on the MU sweeps' register
// tiles: out (m x wp) = V X for X (n x wp) (transpose false: rows_product by row blocks, as
// V H^T), or out (n x wp) = V^T X for X (m x wp) (transpose true: cols_product by row blocks
// into column chunks, as the fused W^T V). V is m x n float32 row-major; wp a multiple of
// every ISA's lanes. V^T X is split into kSketchSlabs slabs of row blocks, each summed in
// block order into its own partial, and the partials are added in slab order: the split
// comes from the shape alone, so each output entry is summed in one order whatever the
// thread count. Returns false if memory ran out.
//
// 2 threads, AMD EPYC Zen 4, V^T X at 26 / 74 columns (GFLOP/s of the unpadded product; MKL's
// X^T V: 42-58 / 81-99): by column blocks of 96 with packed 96 x 96 panels (wtv's scheme)
// 84-94 / 116-145; by slabs, 1024-column chunks: 118-129 / 151-174 with 4 slabs, 112-129 /
// 165-179 with 2. 4 slabs keep 4 x n / 1024 tasks for larger teams; a chunk's partial (1024 x
// wp floats, 128-320 KiB) stays in L2, where whole rows of an 11008-column V did not (77-102).
bool ONG_NMF_SKETCH_PRODUCT(const float* V, std::int64_t m, std::int64_t n, const float* X,
                            std::int64_t wp, float* out, bool transpose, int num_threads) {
  using namespace ONG_NMF_NS;
  constexpr i64 kSketchSlabs = 4, kSketchCols = 1024;  // cpu_nmf.SKETCH_SLABS mirrors the 4
  const int threads = std::max(1, num_threads);
  const i64 row_blocks = (m + kBlock - 1) / kBlock;
  if (!transpose) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (i64 b = 0; b < row_blocks; ++b) {
      const i64 i0 = b * kBlock, rows = std::min(kBlock, m - i0);
      rows_product(V + i0 * n, n, n, rows, X, wp, wp, out + i0 * wp, wp);
    }
    return true;
  }
  const i64 per_slab = (row_blocks + kSketchSlabs - 1) / kSketchSlabs;
  const i64 slabs = (row_blocks + per_slab - 1) / per_slab;
  const i64 chunks = (n + kSketchCols - 1) / kSketchCols;
  Buffer partials;  // slabs 1.. (slab 0 sums into out)
  if (slabs > 1 && !partials.reserve(static_cast<std::size_t>((slabs - 1) * n * wp) * 4))
    return false;
  float* const part = static_cast<float*>(partials.data);
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(dynamic, 1)
    for (i64 task = 0; task < slabs * chunks; ++task) {
      const i64 slab = task % slabs, j0 = task / slabs * kSketchCols;
      const i64 cols = std::min(kSketchCols, n - j0);
      float* acc = (slab == 0 ? out : part + (slab - 1) * n * wp) + j0 * wp;
      const i64 b0 = slab * per_slab, b1 = std::min(row_blocks, b0 + per_slab);
      for (i64 b = b0; b < b1; ++b) {
        const i64 i0 = b * kBlock, rows = std::min(kBlock, m - i0);
        cols_product<float>(V + i0 * n + j0, n, rows, cols, X + i0 * wp, wp, wp, acc, wp, b > b0);
      }
    }
#pragma omp for schedule(static)
    for (i64 j = 0; j < n; ++j)
      for (i64 slab = 1; slab < slabs; ++slab) {
        const float* src = part + (slab - 1) * n * wp + j * wp;
        for (i64 c = 0; c < wp; ++c) out[j * wp + c] += src[c];
      }
  }
  return true;
}

}  // namespace nmf
}  // namespace ong
