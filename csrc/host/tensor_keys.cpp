// Python module ong_kernels._C_host: the per-step host work of the fused optimizer step, in C++.
//
// This is the one part of ong_kernels that links libtorch (libc10 + libtorch_python, for the
// Tensor behind a Python object); the kernels in ong_kernels._C do not (csrc/bindings.cpp says
// why). The reason is measured (issue 17, 2-core Intel Xeon): keying a cached step over
// ResNet-18's 62 tensors costs ~3.5 us per Python `map` over a list (data_ptr, stride, size,
// dtype...), and `layout_key` does one list in ~2 us. Without this module (a build without
// torch headers) the same functions run in Python (ong_kernels/backends/_host.py); the two
// are tested against each other.
//
//   layout_key(tensors, with_address) -> bytes | None
//       Per entry: None, or dtype, device type and index, sizes, strides (and the data address
//       when with_address). Two lists give equal bytes exactly when every entry agrees in all
//       of these. None when an entry's metadata cannot be read (a tensor without storage or
//       strides: the caller's validator explains).
//   grads_of(params) -> list | None
//       [p.grad for p in params] in one pass (3.7 us in Python over 62 tensors, plus 2.6 us to
//       find a None), or None when some parameter has no gradient or overrides
//       __torch_function__ (or a torch function mode is on): the caller then reads p.grad.
//   write_addresses(tensors, table, rows, column) -> None
//       table[rows[i], column] = tensors[i].data_ptr() for every i with rows[i] >= 0. Every
//       index is checked against table's shape: nothing outside `table` is ever written.
//   state_snapshot(state) -> tuple | None;  state_unchanged(state, snapshot) -> bool
//       The objects of an optimizer's state (a dict of dicts: parameter -> {name: value}), and
//       whether the state holds exactly those objects still (identity only, no hashing, no
//       __eq__): what the optimizer's cached call lists were built from.
#include <Python.h>

#include <torch/csrc/autograd/python_variable.h>
#include <ATen/PythonTorchFunctionTLS.h>

#include <cstdint>
#include <string>

namespace {

void append(std::string& out, int64_t v) {
  out.append(reinterpret_cast<const char*>(&v), sizeof v);
}

// One list entry of a layout key: -1 for None (t == nullptr), else dtype, device type and
// index, dimensions, sizes, strides (and the data address when with_address). False (the
// caller discards the key) when the tensor's metadata cannot be read: undefined, not
// strided, or without storage.
bool append_entry(std::string& out, const at::Tensor* t, bool with_address) {
  if (t == nullptr) {
    append(out, -1);
    return true;
  }
  if (!t->defined() || t->layout() != c10::kStrided || !t->has_storage()) return false;
  append(out, static_cast<int64_t>(t->scalar_type()));
  append(out, static_cast<int64_t>(t->device().type()));
  append(out, t->device().index());
  append(out, t->dim());
  for (int64_t s : t->sizes()) append(out, s);
  for (int64_t s : t->strides()) append(out, s);
  if (with_address) append(out, reinterpret_cast<int64_t>(t->data_ptr()));
  return true;
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
const at::Tensor* int64_host(PyObject* obj, int64_t dim, const char* name) {
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

// The snapshot's layout: per entry of `state` (in iteration order) its key, its value, the
// value's size as an int (-1 when the value is not a dict), then the value's keys and values.
// The snapshot holds references to all of them, so no object it names can be freed and
// another one take its address while it is kept.
PyObject* state_snapshot(PyObject*, PyObject* state) {
  if (!PyDict_Check(state)) Py_RETURN_NONE;  // not a dict: never "unchanged"
  Py_ssize_t n = 0, pos = 0;
  PyObject *key, *value;
  while (PyDict_Next(state, &pos, &key, &value)) {
    n += 3 + (PyDict_Check(value) ? 2 * PyDict_GET_SIZE(value) : 0);
  }
  PyObject* out = PyTuple_New(n);
  if (out == nullptr) return nullptr;
  Py_ssize_t at = 0;
  const auto put = [&](PyObject* obj) {  // a new reference, or a borrowed one (incref'd here)
    PyTuple_SET_ITEM(out, at++, obj);
  };
  pos = 0;
  while (PyDict_Next(state, &pos, &key, &value)) {
    Py_INCREF(key);
    put(key);
    Py_INCREF(value);
    put(value);
    const bool is_dict = PyDict_Check(value);
    PyObject* size = PyLong_FromSsize_t(is_dict ? PyDict_GET_SIZE(value) : -1);
    if (size == nullptr) {
      // the tuple's unset items are NULL, which its deallocation skips
      Py_DECREF(out);
      return nullptr;
    }
    put(size);
    if (!is_dict) continue;
    Py_ssize_t inner = 0;
    PyObject *name, *item;
    while (PyDict_Next(value, &inner, &name, &item)) {
      Py_INCREF(name);
      put(name);
      Py_INCREF(item);
      put(item);
    }
  }
  return out;
}

PyObject* state_unchanged(PyObject*, PyObject* args) {
  PyObject *state = nullptr, *snapshot = nullptr;
  if (!PyArg_ParseTuple(args, "OO", &state, &snapshot)) return nullptr;
  if (!PyDict_Check(state) || !PyTuple_Check(snapshot)) Py_RETURN_FALSE;
  PyObject** seen = PySequence_Fast_ITEMS(snapshot);
  const Py_ssize_t n = PyTuple_GET_SIZE(snapshot);
  Py_ssize_t at = 0, pos = 0;
  PyObject *key, *value;
  while (PyDict_Next(state, &pos, &key, &value)) {
    if (at + 3 > n || seen[at] != key || seen[at + 1] != value) Py_RETURN_FALSE;
    const Py_ssize_t size = PyDict_Check(value) ? PyDict_GET_SIZE(value) : -1;
    if (!PyLong_Check(seen[at + 2]) || PyLong_AsSsize_t(seen[at + 2]) != size) Py_RETURN_FALSE;
    at += 3;
    if (size < 0) continue;
    if (at + 2 * size > n) Py_RETURN_FALSE;
    Py_ssize_t inner = 0;
    PyObject *name, *item;
    while (PyDict_Next(value, &inner, &name, &item)) {
      if (seen[at] != name || seen[at + 1] != item) Py_RETURN_FALSE;
      at += 2;
    }
  }
  if (at != n) Py_RETURN_FALSE;
  Py_RETURN_TRUE;
}

PyMethodDef methods[] = {
    {"layout_key", layout_key, METH_VARARGS, "layout_key(tensors, with_address) -> bytes | None"},
    {"write_addresses", write_addresses, METH_VARARGS,
     "write_addresses(tensors, table, rows, column): table[rows[i], column] = data_ptr"},
    {"grads_of", grads_of, METH_O,
     "grads_of(params) -> [p.grad for p in params], or None when one is None"},
    {"state_snapshot", state_snapshot, METH_O,
     "state_snapshot(state) -> the objects of a dict of dicts (None for another type)"},
    {"state_unchanged", state_unchanged, METH_VARARGS,
     "state_unchanged(state, snapshot) -> whether state holds exactly the snapshot's objects"},
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
