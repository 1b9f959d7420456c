// The NMF solver (csrc/cpu/nmf_mu_kernel.h) compiled for avx2: 32-byte vectors, 12 vector
// accumulators per tile.
#define ONG_NMF_NS avx2
#define ONG_NMF_VBYTES 32
#define ONG_NMF_PREFETCH_ROWS 16  // cols_tile's prefetch (nmf_mu_kernel.h)
#define ONG_NMF_PREFETCH_LAST_LINE 0
#define ONG_NMF_ACC 12
#define ONG_NMF_SOLVE_BATCH solve_batch_avx2
#define ONG_NMF_SKETCH_PRODUCT sketch_product_avx2
#include "nmf_mu_kernel.h"
