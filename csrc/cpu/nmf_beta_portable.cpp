// The beta-divergence NMF solver (csrc/cpu/nmf_beta_kernel.h) compiled for portable.
#define ONG_NMF_BETA_NS portable
#define ONG_NMF_BETA_SOLVE_BATCH solve_batch_portable
#include "nmf_beta_kernel.h"
