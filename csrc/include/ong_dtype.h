// Element dtypes understood by the native kernels: defined once here, exported to Python by
// csrc/bindings.cpp as ong_kernels._C.DType (ong_kernels/backends/_native.py maps the names to
// torch dtypes), so the codes are never retyped by hand.
#pragma once

#include <stdexcept>
#include <string>

// X(enumerator, code, name): `name` is the torch dtype's attribute name (torch.float32, ...).
#define ONG_DTYPES(X)              \
  X(kFloat32, 0, "float32")        \
  X(kFloat64, 1, "float64")        \
  X(kFloat16, 2, "float16")        \
  X(kBFloat16, 3, "bfloat16")

namespace ong {

enum class DType : int {
#define ONG_DTYPE_ENUMERATOR(e, code, name) e = code,
  ONG_DTYPES(ONG_DTYPE_ENUMERATOR)
#undef ONG_DTYPE_ENUMERATOR
};

[[noreturn]] inline void unsupported_dtype(const char* where, DType dtype) {
  throw std::invalid_argument(std::string(where) + ": unsupported dtype code " +
                              std::to_string(static_cast<int>(dtype)));
}

}  // namespace ong
