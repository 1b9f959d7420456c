// The CPU kernel of torch.ops.ong_kernels.masked_sgd_step_ and masked_sgd_compact_step_,
// registered with the dispatcher (DispatchKey::CPU) by enable_cpu_step.
//
// Why it exists (issue 17, 2-core Intel Xeon, 62 tiny tensors, 1 thread): the ops' Python
// implementation costs a dispatcher round trip that converts the four tensor lists into
// IValues and back into Python objects (30-41 us with an empty Python body), plus ~22 us of
// Python to find the cached plan and launch it; SGD(fused=True)'s whole step is ~77 us. Here
// a step whose plan is cached costs the IValue conversion only (on the way in) and ~2 us.
//
// The plans themselves are still built in Python (ong_kernels/backends/_multi_tensor.py
// TablePlan, after the shared validator accepted the tensors); the Python PlanCache of the
// CPU kernel mirrors every host-table plan it holds into this cache (plan_put) and drops it
// here when it drops it there (plan_drop), so both forget a plan at the same moment (a model
// deleted, a new optimizer, LRU). Anything else, a cache miss, a plan with tensors the
// native kernel does not take, another backend than "auto"/"cpu", a GradScaler tensor that
// is not one float32 CPU value, goes to the op's Python implementation with the same
// arguments (slow_step), which validates, builds or finds the plan, and raises the Python
// error (ValueError...) a user would get without this kernel. So does backend="auto" while
// ONG_KERNELS_BACKEND is set: the registry's choice is Python's. (A kernel registered or a
// registry patched at run time is seen at the next miss, not by cached plans.)
//
// Memory safety: a cached plan was built from validated tensors; it runs only for lists whose
// key (layout_key encoding: dtype, device, sizes, strides, addresses; gradients without
// addresses) equals the one it was built for. Every address in its tables but the gradients'
// is in that key, so a match means the tables point into the tensors on the stack, alive and
// of the same layout: the plan needs to keep nothing alive.
// The gradients' addresses are written into the plan's table at every step, through rows
// checked against the table's shape when the plan was cached.
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "host.h"
#include "ong_sgd.h"

namespace ong_host {
namespace {

constexpr int kDense = 0;    // masked_sgd_step_: params, grads, bufs, bits, hyper...
constexpr int kCompact = 1;  // masked_sgd_compact_step_: ... bits, offsets, hyper...
constexpr int64_t kGradColumn = 1;  // SgdTensor / SgdCompactTensor::grad
constexpr int kHyperFields = 7;     // ong_kernels/backends/_sgd_args.py SgdHyper

int n_lists(int kind) { return kind == kCompact ? 5 : 4; }
int64_t n_columns(int kind) { return kind == kCompact ? 7 : ong::kSgdTableColumns; }

struct Table {
  int dtype;          // ong::DType code
  at::Tensor table;   // int64 [rows x columns], host: this kernel's own copy
  int64_t rows;
  at::Tensor grad_rows;  // int64 [n params]: gradient i's row, -1 when this table has none
};

struct Plan {
  std::vector<int64_t> key;
  std::vector<Table> tables;
  std::mutex running;  // one step at a time writes the gradient addresses and launches
};

using Slot = std::pair<int64_t, int64_t>;  // first parameter's address, number of params

struct Kind {
  std::mutex mutex;
  std::map<Slot, std::shared_ptr<Plan>> plans;
  ong::SgdCpuEntry launch = nullptr;
  PyObject* impl = nullptr;  // the op's Python implementation (a strong reference)
};

Kind kinds[2];
std::unique_ptr<torch::Library> library;

// The key of the op's tensor lists: every list's length, then its entries (gradients without
// their addresses, which the table takes at every step; plan_put keys the same way). False:
// an entry cannot be keyed.
template <typename Sink>
bool key_of_stack(Sink& sink, int kind, c10::ArrayRef<c10::IValue> args) {
  for (int list = 0; list < n_lists(kind); ++list) {
    const c10::IValue& value = args[list];
    if (!value.isList()) return false;
    const auto items = value.toListRef();
    sink(static_cast<int64_t>(items.size()));
    for (const c10::IValue& item : items) {
      if (item.isNone()) {
        emit_entry(sink, nullptr, false);
      } else if (!item.isTensor() || !emit_entry(sink, &item.toTensor(), list != 1)) {
        return false;
      }
    }
  }
  return true;
}

// The GradScaler tensor's address (0 for None); false: not one float32 value on the CPU (the
// Python implementation raises the error).
bool scalar_address(const c10::IValue& value, std::uintptr_t& address) {
  address = 0;
  if (value.isNone()) return true;
  if (!value.isTensor()) return false;
  const at::Tensor& t = value.toTensor();
  if (!t.defined() || !t.device().is_cpu() || t.scalar_type() != at::kFloat ||
      t.numel() != 1 || t.layout() != c10::kStrided || !t.has_storage())
    return false;
  address = reinterpret_cast<std::uintptr_t>(t.data_ptr());
  return true;
}

bool backend_env_is_auto() {
  const char* value = std::getenv("ONG_KERNELS_BACKEND");
  if (value == nullptr) return true;
  std::string v(value);
  const auto first = v.find_first_not_of(" \t\n");
  if (first == std::string::npos) return true;
  v = v.substr(first, v.find_last_not_of(" \t\n") - first + 1);
  return v == "auto";
}

// The step from the cached plan; false when there is none to run (the caller goes to Python).
bool fast_step(int kind, c10::ArrayRef<c10::IValue> args) {
  Kind& k = kinds[kind];
  const int h0 = n_lists(kind);  // the hyper-parameters follow the lists
  const c10::IValue& backend = args[h0 + kHyperFields];
  if (!backend.isString()) return false;
  const auto& name = backend.toStringRef();
  if (name != "auto" && name != "cpu") return false;
  // "auto" with ONG_KERNELS_BACKEND set (any value but "auto"): the registry's choice, in
  // Python (backends/registry.py reads the variable at every call)
  if (name == "auto" && !backend_env_is_auto()) return false;
  if (!args[0].isList()) return false;
  const auto params = args[0].toListRef();
  if (params.empty() || !params[0].isTensor() || !params[0].toTensor().has_storage()) return false;
  const Slot slot{reinterpret_cast<int64_t>(params[0].toTensor().data_ptr()),
                  static_cast<int64_t>(params.size())};
  std::shared_ptr<Plan> plan;
  ong::SgdCpuEntry launch = nullptr;
  {
    std::lock_guard<std::mutex> lock(k.mutex);
    const auto found = k.plans.find(slot);
    if (found == k.plans.end() || k.launch == nullptr) return false;
    plan = found->second;
    launch = k.launch;
  }
  MatchSink match{plan->key.data(), plan->key.data() + plan->key.size()};
  if (!key_of_stack(match, kind, args) || !match.matched()) return false;
  ong::SgdHyper h{args[h0].toDouble(),     args[h0 + 1].toDouble(), args[h0 + 2].toDouble(),
                  args[h0 + 3].toDouble(), args[h0 + 4].toBool(),   args[h0 + 5].toBool(),
                  args[h0 + 6].toBool(),   0,                       0};
  // Momentum without buffers, or buffers without momentum: Python refuses it (ValueError,
  // _sgd_args.check_momentum); the kernel would write through a null buffer.
  if ((h.momentum != 0.0) == args[2].toListRef().empty()) return false;
  if (!scalar_address(args[h0 + kHyperFields + 1], h.grad_scale) ||
      !scalar_address(args[h0 + kHyperFields + 2], h.found_inf))
    return false;
  const auto grads = args[1].toListRef();  // as many as the key says, each a tensor
  const int threads = at::get_num_threads();
  std::lock_guard<std::mutex> running(plan->running);
  for (const Table& table : plan->tables) {
    int64_t* cells = table.table.data_ptr<int64_t>();
    const int64_t* rows = table.grad_rows.const_data_ptr<int64_t>();
    const int64_t columns = n_columns(kind);
    for (size_t i = 0; i < grads.size(); ++i) {
      if (rows[i] >= 0)
        cells[rows[i] * columns + kGradColumn] =
            reinterpret_cast<int64_t>(grads[i].toTensor().data_ptr());
    }
    char err[256] = {0};
    const int rc = launch(cells, table.rows, table.dtype, &h, threads, err, sizeof err);
    TORCH_CHECK(rc == 0, "ong_kernels CPU masked SGD step: ", err);
  }
  return true;
}

PyObject* to_python(const c10::IValue& value);

// to_python with a C++ exception turned into a Python error (nullptr returned).
PyObject* to_python_or_error(const c10::IValue& value) {
  return python_errors([&] { return to_python(value); });
}

PyObject* to_python(const c10::IValue& value) {
  if (value.isNone()) Py_RETURN_NONE;
  if (value.isTensor()) return THPVariable_Wrap(value.toTensor());
  if (value.isDouble()) return PyFloat_FromDouble(value.toDouble());
  if (value.isBool()) return PyBool_FromLong(value.toBool());
  if (value.isInt()) return PyLong_FromLongLong(value.toInt());
  if (value.isString()) {
    const auto& s = value.toStringRef();
    return PyUnicode_FromStringAndSize(s.data(), static_cast<Py_ssize_t>(s.size()));
  }
  if (value.isList()) {
    const auto items = value.toListRef();
    PyObject* list = PyList_New(static_cast<Py_ssize_t>(items.size()));
    if (list == nullptr) return nullptr;
    for (size_t i = 0; i < items.size(); ++i) {
      PyObject* item = to_python_or_error(items[i]);
      if (item == nullptr) {
        Py_DECREF(list);
        return nullptr;
      }
      PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), item);
    }
    return list;
  }
  PyErr_Format(PyExc_TypeError, "ong_kernels CPU step: unexpected argument %s",
               value.tagKind().c_str());
  return nullptr;
}

// The op's Python implementation with the same arguments; a Python error keeps its type (the
// dispatcher hands pybind11's error_already_set back to the caller, as for Python kernels).
void slow_step(int kind, c10::ArrayRef<c10::IValue> args) {
  pybind11::gil_scoped_acquire gil;
  PyObject* call = PyTuple_New(static_cast<Py_ssize_t>(args.size()));
  if (call == nullptr) throw pybind11::error_already_set();
  for (size_t i = 0; i < args.size(); ++i) {
    PyObject* item = to_python_or_error(args[i]);
    if (item == nullptr) {
      Py_DECREF(call);
      throw pybind11::error_already_set();
    }
    PyTuple_SET_ITEM(call, static_cast<Py_ssize_t>(i), item);
  }
  PyObject* result = PyObject_Call(kinds[kind].impl, call, nullptr);
  Py_DECREF(call);
  if (result == nullptr) throw pybind11::error_already_set();
  Py_DECREF(result);
}

template <int kKind>
void step_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  const size_t n_args = op.schema().arguments().size();
  const auto args = torch::jit::last(*stack, n_args);
  if (!fast_step(kKind, args)) slow_step(kKind, args);
  torch::jit::drop(*stack, n_args);
}

// A Python object's tensor (nullptr for None), or an error: the plan_put lists.
bool tensor_items(PyObject* list, const char* name, std::vector<const at::Tensor*>& out) {
  const Items items(list, name);
  if (!items.ok) return false;
  for (Py_ssize_t i = 0; i < items.size; ++i) {
    PyObject* item = items.items[i];
    if (item == Py_None) {
      out.push_back(nullptr);
    } else if (THPVariable_Check(item)) {
      out.push_back(&THPVariable_Unpack(item));
    } else {
      PyErr_Format(PyExc_TypeError, "%s[%zd] is a %s, not a Tensor", name, i,
                   Py_TYPE(item)->tp_name);
      return false;
    }
  }
  return true;
}

bool parse_kind(int kind) {
  if (kind == kDense || kind == kCompact) return true;
  PyErr_Format(PyExc_ValueError, "kind must be 0 (dense) or 1 (compact), got %d", kind);
  return false;
}

}  // namespace

PyObject* enable_cpu_step(PyObject*, PyObject* args) {
  PyObject *entries = nullptr, *dense_impl = nullptr, *compact_impl = nullptr;
  if (!PyArg_ParseTuple(args, "O!OO", &PyDict_Type, &entries, &dense_impl, &compact_impl))
    return nullptr;
  PyObject* abi = PyDict_GetItemString(entries, "abi");
  PyObject* dense = PyDict_GetItemString(entries, "dense");
  PyObject* compact = PyDict_GetItemString(entries, "compact");
  if (abi == nullptr || dense == nullptr || compact == nullptr ||
      PyLong_AsLong(abi) != ong::kSgdEntryAbi) {
    if (!PyErr_Occurred())
      PyErr_Format(PyExc_RuntimeError,
                   "ong_kernels._C's masked_sgd_entry_points are not of this _C_host (abi %d): "
                   "rebuild both", ong::kSgdEntryAbi);
    return nullptr;
  }
  const auto dense_entry = reinterpret_cast<ong::SgdCpuEntry>(PyLong_AsUnsignedLongLong(dense));
  const auto compact_entry =
      reinterpret_cast<ong::SgdCpuEntry>(PyLong_AsUnsignedLongLong(compact));
  if (PyErr_Occurred()) return nullptr;
  if (dense_entry == nullptr || compact_entry == nullptr) {
    PyErr_SetString(PyExc_ValueError, "enable_cpu_step: a null entry point");
    return nullptr;
  }
  if (!PyCallable_Check(dense_impl) || !PyCallable_Check(compact_impl)) {
    PyErr_SetString(PyExc_TypeError, "enable_cpu_step: the implementations must be callable");
    return nullptr;
  }
  try {
    const ong::SgdCpuEntry launch[2] = {dense_entry, compact_entry};
    PyObject* impl[2] = {dense_impl, compact_impl};
    for (int kind : {kDense, kCompact}) {
      std::lock_guard<std::mutex> lock(kinds[kind].mutex);
      Py_INCREF(impl[kind]);
      Py_XDECREF(kinds[kind].impl);
      kinds[kind].impl = impl[kind];
      kinds[kind].launch = launch[kind];
    }
    if (!library) {
      auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, "ong_kernels",
                                                  c10::DispatchKey::CPU, __FILE__, __LINE__);
      lib->impl("masked_sgd_step_",
                torch::CppFunction::makeFromBoxedFunction<&step_kernel<kDense>>());
      lib->impl("masked_sgd_compact_step_",
                torch::CppFunction::makeFromBoxedFunction<&step_kernel<kCompact>>());
      library = std::move(lib);
    }
  } catch (const std::exception& err) {
    PyErr_SetString(PyExc_RuntimeError, err.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* disable_cpu_step(PyObject*, PyObject*) {
  // The ops' Python implementation serves CPU tensors again; the plans stay, in step with
  // the PlanCaches that own them, for when the kernel is registered again.
  library.reset();
  Py_RETURN_NONE;
}

namespace {
PyObject* plan_put_checked(PyObject* args);
}

PyObject* plan_put(PyObject*, PyObject* args) {
  return python_errors([&] { return plan_put_checked(args); });
}

namespace {
PyObject* plan_put_checked(PyObject* args) {
  int kind = 0;
  PyObject *lists = nullptr, *tables = nullptr;
  if (!PyArg_ParseTuple(args, "iOO", &kind, &lists, &tables) || !parse_kind(kind))
    return nullptr;
  const Items list_items(lists, "lists");
  if (!list_items.ok) return nullptr;
  if (list_items.size != n_lists(kind)) {
    PyErr_Format(PyExc_ValueError, "plan_put: %d lists expected, got %zd", n_lists(kind),
                 list_items.size);
    return nullptr;
  }
  auto plan = std::make_shared<Plan>();
  VectorSink key{plan->key};
  std::vector<const at::Tensor*> params;
  size_t n_grads = 0;
  for (int list = 0; list < n_lists(kind); ++list) {
    std::vector<const at::Tensor*> items;
    if (!tensor_items(list_items.items[list], "lists[i]", items)) return nullptr;
    key(static_cast<int64_t>(items.size()));
    for (const at::Tensor* t : items) {
      if ((t == nullptr && list < 2) || !emit_entry(key, t, list != 1)) {
        PyErr_Format(PyExc_ValueError, "plan_put: lists[%d] has an entry that cannot be keyed",
                     list);
        return nullptr;
      }
    }
    if (list == 0) params = items;
    if (list == 1) n_grads = items.size();
  }
  if (params.empty() || n_grads != params.size()) {
    PyErr_SetString(PyExc_ValueError, "plan_put: no parameters, or not one gradient each");
    return nullptr;
  }
  const Items table_items(tables, "tables");
  if (!table_items.ok) return nullptr;
  for (Py_ssize_t i = 0; i < table_items.size; ++i) {
    int dtype = 0;
    long long rows = 0;
    PyObject *table_obj = nullptr, *grad_rows_obj = nullptr;
    if (!PyArg_ParseTuple(table_items.items[i], "iOLO", &dtype, &table_obj, &rows,
                          &grad_rows_obj))
      return nullptr;
    const at::Tensor* table = int64_host(table_obj, 2, "table");
    const at::Tensor* grad_rows = table ? int64_host(grad_rows_obj, 1, "grad_rows") : nullptr;
    if (grad_rows == nullptr) return nullptr;
    const bool dtype_ok = dtype == static_cast<int>(ong::DType::kFloat32) ||
                          dtype == static_cast<int>(ong::DType::kFloat64);
    bool rows_ok = grad_rows->numel() == static_cast<int64_t>(n_grads);
    const int64_t* row = grad_rows->const_data_ptr<int64_t>();
    for (int64_t g = 0; rows_ok && g < grad_rows->numel(); ++g)
      rows_ok = row[g] >= -1 && row[g] < rows;
    if (!dtype_ok || rows < 1 || table->size(0) != rows || table->size(1) != n_columns(kind) ||
        !rows_ok) {
      PyErr_Format(PyExc_ValueError,
                   "plan_put: table %zd must be float32/float64 (code %d), %lld x %lld rows "
                   "with %zu gradient rows in [-1, %lld)",
                   i, dtype, rows, static_cast<long long>(n_columns(kind)), n_grads, rows);
      return nullptr;
    }
    // copies: this table is written (gradient addresses) by this kernel only
    plan->tables.push_back({dtype, table->clone(), rows, grad_rows->clone()});
  }
  const Slot slot{reinterpret_cast<int64_t>(params[0]->data_ptr()),
                  static_cast<int64_t>(params.size())};
  std::shared_ptr<Plan> replaced;  // freed after the lock
  {
    std::lock_guard<std::mutex> lock(kinds[kind].mutex);
    std::shared_ptr<Plan>& entry = kinds[kind].plans[slot];
    replaced = std::move(entry);
    entry = std::move(plan);
  }
  Py_RETURN_NONE;
}
}  // namespace

PyObject* plan_drop(PyObject*, PyObject* args) {
  int kind = 0;
  PyObject *address = nullptr, *n = nullptr;
  if (!PyArg_ParseTuple(args, "iOO", &kind, &address, &n) || !parse_kind(kind)) return nullptr;
  // freed after the lock (nothing is freed under it); a plan
  // another thread is running goes when that step ends
  std::shared_ptr<Plan> dropped;
  std::map<Slot, std::shared_ptr<Plan>> all;
  {
    std::lock_guard<std::mutex> lock(kinds[kind].mutex);
    if (address == Py_None) {
      all.swap(kinds[kind].plans);
    } else {
      const Slot slot{PyLong_AsLongLong(address), PyLong_AsLongLong(n)};
      if (PyErr_Occurred()) return nullptr;
      const auto found = kinds[kind].plans.find(slot);
      if (found != kinds[kind].plans.end()) {
        dropped = std::move(found->second);
        kinds[kind].plans.erase(found);
      }
    }
  }
  Py_RETURN_NONE;
}

PyObject* plan_count(PyObject*, PyObject* args) {
  int kind = 0;
  if (!PyArg_ParseTuple(args, "i", &kind) || !parse_kind(kind)) return nullptr;
  std::lock_guard<std::mutex> lock(kinds[kind].mutex);
  return PyLong_FromSize_t(kinds[kind].plans.size());
}

}  // namespace ong_host
