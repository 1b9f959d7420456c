// The NMF solver (csrc/cpu/nmf_mu_kernel.h) compiled for avx512: 64-byte vectors, 24 vector
// accumulators per tile.
#define ONG_NMF_NS avx512
#define ONG_NMF_VBYTES 64
#define ONG_NMF_PREFETCH_ROWS 32  // cols_tile's prefetch (nmf_mu_kernel.h)
#define ONG_NMF_PREFETCH_LAST_LINE 1
#define ONG_NMF_ACC 24
#define ONG_NMF_SOLVE_BATCH solve_batch_avx512
#define ONG_NMF_SKETCH_PRODUCT sketch_product_avx512
#include "nmf_mu_kernel.h"
