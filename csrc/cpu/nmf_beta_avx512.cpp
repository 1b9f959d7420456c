// The beta-divergence NMF solver (csrc/cpu/nmf_beta_kernel.h) compiled for avx512.
#define ONG_NMF_BETA_NS avx512
#define ONG_NMF_BETA_SOLVE_BATCH solve_batch_avx512
#include "nmf_beta_kernel.h"
