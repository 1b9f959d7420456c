// The beta-divergence NMF solver (csrc/cpu/nmf_beta_kernel.h) compiled for avx2.
#define ONG_NMF_BETA_NS avx2
#define ONG_NMF_BETA_SOLVE_BATCH solve_batch_avx2
#include "nmf_beta_kernel.h"
