// Python module ong_kernels._C_host: the per-step host work of the fused optimizer step, in C++.
//
// This is the one part of ong_kernels that links libtorch (libc10 + libtorch_python, for the
// Tensor behind a Python object and the dispatcher); the kernels in ong_kernels._C do not
// (csrc/bindings.cpp says why). The reason is measured (issue 17, 2-core Intel Xeon): keying a
// cached step over ResNet-18's 62 tensors costs ~3.5 us per Python `map` over a list
// (data_ptr, stride, size, dtype...), and `layout_key` does one list in ~2 us. This file holds
// the keys the optimizer asks for; cpu_step.cpp the ops' CPU kernel. Without this module (a
// build without torch headers) the same keys are made in Python (ong_kernels/backends/
// _host.py); the two are tested against each other.
//
//   layout_key(tensors, with_address) -> bytes | None
//       Per entry: None, or layout code, dtype, device type and index, sizes, strides (and
//       the data address when with_address). Two lists give equal bytes exactly when every
//       entry agrees in all of these. None when an entry's metadata cannot be read (a tensor
//       without storage or strides: the caller's validator explains).
//   grads_of(params) -> list | None
//       [p.grad for p in params] in one pass (3.7 us in Python over 62 tensors, plus 2.6 us to
//       find a None), or None when some parameter has no gradient or overrides
//       __torch_function__ (or a torch function mode is on): the caller then reads p.grad.
//   write_addresses(tensors, table, rows, column) -> None
//       table[rows[i], column] = tensors[i].data_ptr() for every i with rows[i] >= 0. Every
//       index is checked against table's shape: nothing outside `table` is ever written.
#include <Python.h>

#include <torch/csrc/autograd/python_variable.h>
#include <ATen/PythonTorchFunctionTLS.h>

#include <cstdint>
#include <string>

#include "host.h"

namespace {

using ong_host::append_entry;
using ong_host::int64_host;
using ong_host::Items;

PyObject* layout_key(PyObject*, PyObject* args) {
  PyObject* list = nullptr;
  int with_address = 0;
  if (!PyArg_ParseTuple(args, "Op", &list, &with_address)) return nullptr;
  const Items tensors(list, "tensors");
  if (!tensors.ok) return nullptr;
  const Py_ssize_t n = tensors.size;
  std::string out;
  out.reserve(static_cast<size_t>(n) * 80);
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* item = tensors.items[i];
      if (item != Py_None && !THPVariable_Check(item)) {
        PyErr_Format(PyExc_TypeError, "tensors[%zd] is a %s, not a Tensor", i, Py_TYPE(item)->tp_name);
        return nullptr;
      }
      const at::Tensor* t = item == Py_None ? nullptr : &THPVariable_Unpack(item);
      if (!append_entry(out, t, with_address)) Py_RETURN_NONE;
    }
  } catch (const std::exception&) {  // a tensor whose data pointer cannot be read
    Py_RETURN_NONE;
  }
  return PyBytes_FromStringAndSize(out.data(), static_cast<Py_ssize_t>(out.size()));
}

PyObject* write_addresses(PyObject*, PyObject* args) {
  PyObject *list = nullptr, *table_obj = nullptr, *rows_obj = nullptr;
  long long column = 0;
  if (!PyArg_ParseTuple(args, "OOOL", &list, &table_obj, &rows_obj, &column)) return nullptr;
  const Items tensors(list, "tensors");
  if (!tensors.ok) return nullptr;
  const at::Tensor* table = int64_host(table_obj, 2, "table");
  const at::Tensor* rows = table ? int64_host(rows_obj, 1, "rows") : nullptr;
  if (rows == nullptr) return nullptr;
  const Py_ssize_t n = tensors.size;
  const int64_t n_rows = table->size(0), n_cols = table->size(1);
  if (rows->numel() != n || column < 0 || column >= n_cols) {
    PyErr_Format(PyExc_ValueError, "write_addresses: %zd tensors, %lld rows, column %lld of %lld",
                 n, static_cast<long long>(rows->numel()), column, static_cast<long long>(n_cols));
    return nullptr;
  }
  const int64_t* row = rows->const_data_ptr<int64_t>();
  // Check everything before writing anything.
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (row[i] < 0) continue;
    PyObject* item = tensors.items[i];
    if (row[i] >= n_rows || !THPVariable_Check(item) ||
        THPVariable_Unpack(item).layout() != c10::kStrided ||
        !THPVariable_Unpack(item).has_storage()) {
      PyErr_Format(PyExc_ValueError, "write_addresses: entry %zd (row %lld of %lld)", i,
                   static_cast<long long>(row[i]), static_cast<long long>(n_rows));
      return nullptr;
    }
  }
  int64_t* cell = table->data_ptr<int64_t>();
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (row[i] < 0) continue;
      const at::Tensor& t = THPVariable_Unpack(tensors.items[i]);
      cell[row[i] * n_cols + column] = reinterpret_cast<int64_t>(t.data_ptr());
    }
  } catch (const std::exception& err) {
    PyErr_SetString(PyExc_RuntimeError, err.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

// True when `p.grad` of this object is the C++ one: a torch.Tensor or torch.nn.Parameter
// (whose __torch_function__ is disabled), with no torch function mode active.
bool plain_parameter(PyObject* p) {
  static PyObject* parameter_type = nullptr;  // torch.nn.Parameter, looked up once
  if (parameter_type == nullptr) {
    PyObject* module = PyImport_ImportModule("torch.nn.parameter");
    parameter_type = module ? PyObject_GetAttrString(module, "Parameter") : nullptr;
    Py_XDECREF(module);
    if (parameter_type == nullptr) return false;
  }
  return (THPVariable_CheckExact(p) || Py_TYPE(p) == reinterpret_cast<PyTypeObject*>(parameter_type)) &&
         !at::impl::torch_function_mode_enabled();
}

PyObject* grads_of_checked(PyObject* list);

PyObject* grads_of(PyObject*, PyObject* list) {
  try {
    return grads_of_checked(list);
  } catch (const std::exception& err) {
    PyErr_SetString(PyExc_RuntimeError, err.what());
    return nullptr;
  }
}

PyObject* grads_of_checked(PyObject* list) {
  const Items params(list, "params");
  if (!params.ok) return nullptr;
  PyObject* out = PyList_New(params.size);
  if (out == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < params.size; ++i) {
    PyObject* p = params.items[i];
    if (!THPVariable_Check(p)) {
      Py_DECREF(out);
      PyErr_Format(PyExc_TypeError, "params[%zd] is a %s, not a Tensor", i, Py_TYPE(p)->tp_name);
      return nullptr;
    }
    if (!plain_parameter(p)) {  // a subclass's own .grad, or a torch function mode: Python's
      Py_DECREF(out);
      if (PyErr_Occurred()) return nullptr;
      Py_RETURN_NONE;
    }
    const at::Tensor& grad = THPVariable_Unpack(p).grad();
    if (!grad.defined()) {  // a parameter without a gradient: the caller filters in Python
      Py_DECREF(out);
      Py_RETURN_NONE;
    }
    PyObject* wrapped = nullptr;
    try {
      wrapped = THPVariable_Wrap(grad);
    } catch (...) {
      Py_DECREF(out);
      throw;
    }
    if (wrapped == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyList_SET_ITEM(out, i, wrapped);
  }
  return out;
}

PyMethodDef methods[] = {
    {"layout_key", layout_key, METH_VARARGS, "layout_key(tensors, with_address) -> bytes | None"},
    {"write_addresses", write_addresses, METH_VARARGS,
     "write_addresses(tensors, table, rows, column): table[rows[i], column] = data_ptr"},
    {"grads_of", grads_of, METH_O,
     "grads_of(params) -> [p.grad for p in params], or None when one is None"},
    {"enable_cpu_step", ong_host::enable_cpu_step, METH_VARARGS,
     "enable_cpu_step(entry_points, dense_impl, compact_impl): register the CPU dispatcher "
     "kernel of masked_sgd_step_ and masked_sgd_compact_step_"},
    {"disable_cpu_step", ong_host::disable_cpu_step, METH_NOARGS,
     "disable_cpu_step(): deregister it (the ops' Python implementation serves CPU tensors)"},
    {"plan_put", ong_host::plan_put, METH_VARARGS,
     "plan_put(kind, lists, tables): cache a host-table plan for the dispatcher kernel"},
    {"plan_drop", ong_host::plan_drop, METH_VARARGS,
     "plan_drop(kind, address, n): forget the plan of a call site (None: every plan)"},
    {"plan_count", ong_host::plan_count, METH_VARARGS, "plan_count(kind) -> cached plans"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_host",
                      "Per-step host work of the fused optimizer step (links libtorch)", -1,
                      methods};

}  // namespace

// The torch it was compiled against: ong_kernels/backends/_host.py does not use a module
// built for another torch (TensorImpl's layout is not a stable ABI).
PyMODINIT_FUNC PyInit__C_host() {
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr && PyModule_AddStringConstant(m, "torch_version", ONG_TORCH_VERSION) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
