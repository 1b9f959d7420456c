// CPU feature detection and the process-wide ISA choice (see ong_isa.h).
#include "ong_isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace ong {
namespace {

Isa detect() {
#if defined(__x86_64__) && defined(ONG_HAVE_X86_KERNELS)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kPortable;
}

Isa parse(const char* name) {
  if (std::strcmp(name, "portable") == 0) return Isa::kPortable;
  if (std::strcmp(name, "avx2") == 0) return Isa::kAvx2;
  if (std::strcmp(name, "avx512") == 0) return Isa::kAvx512;
  throw std::invalid_argument(std::string("ONG_KERNELS_ISA: unknown ISA '") + name +
                              "' (portable, avx2, avx512)");
}

std::atomic<int>& current() {
  static std::atomic<int> isa{[] {
    const Isa best = detect();
    const char* env = std::getenv("ONG_KERNELS_ISA");
    if (env == nullptr || *env == '\0') return static_cast<int>(best);
    const Isa wanted = parse(env);
    // Asking for more than the CPU has falls back to the best it has (never a SIGILL).
    return static_cast<int>(static_cast<int>(wanted) < static_cast<int>(best) ? wanted : best);
  }()};
  return isa;
}

}  // namespace

Isa best_isa() {
  static const Isa best = detect();
  return best;
}

Isa active_isa() { return static_cast<Isa>(current().load(std::memory_order_relaxed)); }

void set_isa(Isa isa) {
  if (static_cast<int>(isa) > static_cast<int>(best_isa())) {
    throw std::invalid_argument(std::string("set_isa: this CPU or build has no ") + isa_name(isa) +
                                " (best: " + isa_name(best_isa()) + ")");
  }
  current().store(static_cast<int>(isa), std::memory_order_relaxed);
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kPortable: return "portable";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
  }
  return "unknown";
}

}  // namespace ong
