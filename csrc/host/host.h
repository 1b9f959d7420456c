// Shared pieces of ong_kernels._C_host (csrc/host/): the plan-key encoding, used both for
// the keys Python asks for (tensor_keys.cpp) and by the dispatcher kernel (cpu_step.cpp), so
// a key made from Python objects and one made from the dispatcher's IValues are equal exactly
// when the tensors agree.
#pragma once

#include <Python.h>

#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <string>
#include <vector>

namespace ong_host {

inline void append(std::string& out, int64_t v) {
  out.append(reinterpret_cast<const char*>(&v), sizeof v);
}

// Where a key's values go: appended to bytes (StringSink: the keys Python gets), appended to a
// vector (VectorSink: a cached plan's key) or compared with a cached key as they come
// (MatchSink: the dispatcher kernel's lookup, no key built).
struct StringSink {
  std::string& out;
  void operator()(int64_t v) { append(out, v); }
};
struct VectorSink {
  std::vector<int64_t>& out;
  void operator()(int64_t v) { out.push_back(v); }
};
struct MatchSink {
  const int64_t* next;
  const int64_t* end;
  bool same = true;
  void operator()(int64_t v) { same = same && next != end && *next++ == v; }
  bool matched() const { return same && next == end; }
};

// One list entry of a layout key: -1 for None (t == nullptr), else dtype, device type and
// index, dimensions, sizes, strides (and the data address when with_address). False (the
// caller discards the key) when the tensor's metadata cannot be read: undefined, not
// strided, or without storage.
template <typename Sink>
inline bool emit_entry(Sink& sink, const at::Tensor* t, bool with_address) {
  if (t == nullptr) {
    sink(-1);
    return true;
  }
  if (!t->defined() || t->layout() != c10::kStrided || !t->has_storage()) return false;
  sink(static_cast<int64_t>(t->scalar_type()));
  sink(static_cast<int64_t>(t->device().type()));
  sink(t->device().index());
  sink(t->dim());
  for (int64_t s : t->sizes()) sink(s);
  for (int64_t s : t->strides()) sink(s);
  if (with_address) sink(reinterpret_cast<int64_t>(t->data_ptr()));
  return true;
}

inline bool append_entry(std::string& out, const at::Tensor* t, bool with_address) {
  StringSink sink{out};
  return emit_entry(sink, t, with_address);
}

// A list or tuple's items, borrowed from `obj` (a list or tuple, else TypeError).
struct Items {
  PyObject** items = nullptr;
  Py_ssize_t size = 0;
  bool ok = false;
  Items(PyObject* obj, const char* name) {
    if (!PyList_Check(obj) && !PyTuple_Check(obj)) {
      PyErr_Format(PyExc_TypeError, "%s must be a list or tuple, got %s", name,
                   Py_TYPE(obj)->tp_name);
      return;
    }
    items = PySequence_Fast_ITEMS(obj);
    size = PySequence_Fast_GET_SIZE(obj);
    ok = true;
  }
};

// An int64, contiguous, CPU tensor of `dim` dimensions behind `obj`, or nullptr (error set).
inline const at::Tensor* int64_host(PyObject* obj, int64_t dim, const char* name) {
  if (!THPVariable_Check(obj)) {
    PyErr_Format(PyExc_TypeError, "%s must be a Tensor", name);
    return nullptr;
  }
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!t.defined() || t.scalar_type() != at::kLong || !t.device().is_cpu() ||
      t.layout() != c10::kStrided || t.dim() != dim || !t.is_contiguous()) {
    PyErr_Format(PyExc_ValueError, "%s must be a contiguous %lld-D int64 CPU tensor", name,
                 static_cast<long long>(dim));
    return nullptr;
  }
  return &t;
}

// `body()` (a PyObject* or nullptr with a Python error set) with a C++ exception (a tensor
// whose data cannot be read, no memory) turned into a Python RuntimeError: nothing thrown
// crosses a C-API function.
template <typename Body>
PyObject* python_errors(Body&& body) {
  try {
    return body();
  } catch (const std::exception& err) {
    PyErr_SetString(PyExc_RuntimeError, err.what());
    return nullptr;
  }
}

// The methods of cpu_step.cpp, in the module's method table (tensor_keys.cpp).
PyObject* enable_cpu_step(PyObject*, PyObject* args);
PyObject* disable_cpu_step(PyObject*, PyObject*);
PyObject* plan_put(PyObject*, PyObject* args);
PyObject* plan_drop(PyObject*, PyObject* args);
PyObject* plan_count(PyObject*, PyObject* args);

}  // namespace ong_host
