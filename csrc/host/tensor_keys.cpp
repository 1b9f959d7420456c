// Python module ong_kernels._C_host: the per-step host work of the fused optimizer step, in C++.
//
// This is the one part of ong_kernels that links libtorch (libc10 + libtorch_python, for the
// Tensor behind a Python object); the kernels in ong_kernels._C do not (csrc/bindings.cpp says
// why). The reason is measured (issue 17, 2-core Intel Xeon): keying a cached step over
// ResNet-18's 62 tensors costs ~3.5 us per Python `map` over a list (data_ptr, stride, size,
// dtype...: 32 us of a 120 us step), and `layout_key` does one list in 0.8 us. Without this
// module (a build without torch headers) the same keys are made in Python
// (ong_kernels/backends/_host.py); the two are tested against each other.
//
//   layout_key(tensors, with_address) -> bytes | None
//       Per entry: None, or layout code, dtype, device type and index, sizes, strides (and
//       the data address when with_address). Two lists give equal bytes exactly when every
//       entry agrees in all of these. None when an entry's metadata cannot be read (a tensor
//       without storage or strides: the caller's validator explains).
//   write_addresses(tensors, table, rows, column) -> None
//       table[rows[i], column] = tensors[i].data_ptr() for every i with rows[i] >= 0. Every
//       index is checked against table's shape: nothing outside `table` is ever written.
#include <Python.h>

#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <string>

namespace {

void append(std::string& out, int64_t v) { out.append(reinterpret_cast<const char*>(&v), sizeof v); }

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
      if (item == Py_None) {
        append(out, -1);
        continue;
      }
      if (!THPVariable_Check(item)) {
        PyErr_Format(PyExc_TypeError, "tensors[%zd] is a %s, not a Tensor", i, Py_TYPE(item)->tp_name);
        return nullptr;
      }
      const at::Tensor& t = THPVariable_Unpack(item);
      if (!t.defined() || t.layout() != c10::kStrided || !t.has_storage()) Py_RETURN_NONE;
      append(out, static_cast<int64_t>(t.scalar_type()));
      append(out, static_cast<int64_t>(t.device().type()));
      append(out, t.device().index());
      append(out, t.dim());
      for (int64_t s : t.sizes()) append(out, s);
      for (int64_t s : t.strides()) append(out, s);
      if (with_address) append(out, reinterpret_cast<int64_t>(t.data_ptr()));
    }
  } catch (const std::exception&) {  // a tensor whose data pointer cannot be read
    Py_RETURN_NONE;
  }
  return PyBytes_FromStringAndSize(out.data(), static_cast<Py_ssize_t>(out.size()));
}

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

PyMethodDef methods[] = {
    {"layout_key", layout_key, METH_VARARGS, "layout_key(tensors, with_address) -> bytes | None"},
    {"write_addresses", write_addresses, METH_VARARGS,
     "write_addresses(tensors, table, rows, column): table[rows[i], column] = data_ptr"},
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
