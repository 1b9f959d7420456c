// Runtime instruction-set dispatch for the CPU kernels.
//
// The kernels' ISA-specific code lives in its own translation units, each compiled with its
// own -m flags (CMakeLists.txt), and is called only after `active_isa()` has checked the CPU,
// so one build runs on any x86-64 (and the portable path on any CPU). The ISA-specific units
// keep their code in a per-ISA namespace or an anonymous one: an inline function compiled
// with AVX-512 in one unit must never be the copy the linker keeps for another.
#pragma once

namespace ong {

enum class Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// The best ISA this CPU and this build support.
Isa best_isa();
// The ISA the kernels use now: best_isa(), unless lowered by set_isa (tests, benchmarks) or
// by the environment variable ONG_KERNELS_ISA=portable|avx2|avx512 read at first use.
Isa active_isa();
// Lower (or restore) the ISA; throws std::invalid_argument above best_isa().
void set_isa(Isa isa);
const char* isa_name(Isa isa);

}  // namespace ong
