// The NMF solver (csrc/cpu/nmf_mu_kernel.h) compiled for portable: 16-byte vectors, 12 vector
// accumulators per tile. Baseline flags (SSE2 on x86-64): runs on any CPU.
#define ONG_NMF_NS portable
#define ONG_NMF_VBYTES 16
#define ONG_NMF_PREFETCH_ROWS 8  // cols_tile's prefetch (nmf_mu_kernel.h)
#define ONG_NMF_PREFETCH_LAST_LINE 0
#define ONG_NMF_ACC 12
#define ONG_NMF_SOLVE_BATCH solve_batch_portable
#define ONG_NMF_SKETCH_PRODUCT sketch_product_portable
#include "nmf_mu_kernel.h"
