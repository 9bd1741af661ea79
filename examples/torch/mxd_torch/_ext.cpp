// SPDX-License-Identifier: MIT
// mxd_torch's C++ side: a thin adapter from torch tensors to mxd. Parameters, gradients and
// activations stay in torch's memory; mxd borrows them (Tensor::borrow, Params::borrow) for
// forward, backward, AdamW and file I/O. Everything here is checking shapes, dtypes and
// layouts, and turning mxd::Error into the Python exception mxd_torch.Error.
//
// Layouts: torch holds every parameter under the authors' name and shape. The one matrix mxd
// keeps transposed (MxD's W_cond [O, N] = C^T, the transcoder's W_enc [I, M]) is created by
// the Python side as the transpose of a contiguous tensor in mxd's layout, so its memory is
// mxd's and no call ever copies it; the autograd gradient of that parameter gets the same
// strides, so AccumulateGrad and torch's optimizers keep the layout too.
#include <ATen/ATen.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <mxd/baselines/transcoder.hpp>
#include <mxd/init.hpp>
#include <mxd/io/checkpoint.hpp>
#include <mxd/io/params_io.hpp>
#include <mxd/mxd.hpp>

namespace py = pybind11;
using mxd::index_t;

namespace {

// The scope of one mxd call: without the GIL (other Python threads run meanwhile).
struct Compute {
  py::gil_scoped_release nogil;
};

template <class T>
constexpr at::ScalarType scalar_of() {
  return std::is_same_v<T, float> ? at::kFloat : at::kDouble;
}

std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (std::size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

void check_device(const at::Tensor& t, const char* name) {
  MXD_CHECK(t.device().is_cpu(), name, " is on ", t.device().str(), ": mxd_torch computes on the CPU",
            t.device().is_cuda() ? " (it was built without CUDA)" : "");
}

// The memory of parameter `name`, which mxd sees as row-major [rows, cols]. On the torch
// side it is [rows, cols] contiguous, [cols] for a bias, or, when `transposed`, [cols, rows]
// with strides (1, cols): the transpose of mxd's contiguous matrix.
template <class T>
T* borrow_memory(const at::Tensor& t, const char* name, index_t rows, index_t cols,
                 bool transposed) {
  MXD_CHECK(t.defined(), name, " is missing (None)");
  check_device(t, name);
  MXD_CHECK(t.scalar_type() == scalar_of<T>(), name, " has dtype ", c10::toString(t.scalar_type()),
            ", expected ", c10::toString(scalar_of<T>()), " (the layer's dtype, W_enc's)");
  const bool bias = mxd::is_bias(name);
  std::vector<std::int64_t> want = transposed ? std::vector<std::int64_t>{cols, rows}
                                   : bias     ? std::vector<std::int64_t>{cols}
                                              : std::vector<std::int64_t>{rows, cols};
  MXD_CHECK(t.sizes().vec() == want, name, " has shape ", shape_str(t.sizes()), ", expected ",
            shape_str(want));
  if (transposed)
    MXD_CHECK(t.t().is_contiguous(), name, " ", shape_str(t.sizes()), " has strides ",
              shape_str(t.strides()), ": mxd needs it stored as the transpose of a contiguous ",
              shape_str({rows, cols}), " (as mxd_torch creates it; assign through .copy_())");
  else
    MXD_CHECK(t.is_contiguous(), name, " has strides ", shape_str(t.strides()),
              " and must be contiguous");
  return t.data_ptr<T>();
}

// A new torch tensor laid out as borrow_memory expects, for a gradient or a loaded parameter.
at::Tensor empty_like_param(const char* name, index_t rows, index_t cols, bool transposed,
                            at::TensorOptions opts) {
  if (transposed) return at::empty({rows, cols}, opts).t();
  if (mxd::is_bias(name)) return at::empty({cols}, opts);
  return at::empty({rows, cols}, opts);
}

// The scalar type of a parameter set (Params<T>, TranscoderParams<T>).
template <class Set>
struct scalar_of_set;
template <template <class, class> class SetT, class T>
struct scalar_of_set<SetT<T, mxd::cpu>> {
  using type = T;
};

// Binds a parameter set over torch tensors given in the set's order (Params::borrow and
// TranscoderParams::borrow call `memory` in that order).
template <class Set, class Config>
Set borrow_set(const Config& c, const std::vector<at::Tensor>& tensors, const char* what) {
  using T = typename scalar_of_set<Set>::type;
  std::size_t i = 0;
  Set s = Set::borrow(c, [&](const char* name, index_t rows, index_t cols) {
    MXD_CHECK(i < tensors.size(), what, ": ", tensors.size(), " tensors given, but ", name,
              " is number ", i + 1);
    return borrow_memory<T>(tensors[i++], name, rows, cols, Set::transposed_in_file(name));
  });
  MXD_CHECK(i == tensors.size(), what, ": ", tensors.size(), " tensors given, expected ", i);
  return s;
}

// Gradient memory kept from one backward to the next. Fresh memory costs page faults (about
// 70 ms of CPU for GPT-2 small's 38 M gradients, a quarter of a training step), so a
// parameter whose .grad already exists, to which autograd adds the new gradient in place,
// gets its gradient in a buffer kept here, reused once nobody else holds it. A parameter
// without .grad gets fresh memory, which autograd then takes over as .grad without a copy.
struct GradBuffers {
  std::vector<at::Tensor> held;  // in mxd's layout (contiguous)
};

// Torch tensors for every parameter of a set (fresh, or with `reuse`, buffers from it where
// reuse_ok[i]), and the set borrowing them.
template <class Set, class Config>
std::pair<Set, std::vector<at::Tensor>> allocate_set(const Config& c, at::TensorOptions opts,
                                                     GradBuffers* reuse = nullptr,
                                                     const std::vector<bool>& reuse_ok = {}) {
  using T = typename scalar_of_set<Set>::type;
  std::vector<at::Tensor> out;
  Set s = Set::borrow(c, [&](const char* name, index_t rows, index_t cols) {
    const std::size_t i = out.size();
    const bool transposed = Set::transposed_in_file(name);
    if (!reuse || i >= reuse_ok.size() || !reuse_ok[i]) {
      out.push_back(empty_like_param(name, rows, cols, transposed, opts));
      return out.back().template data_ptr<T>();
    }
    if (reuse->held.size() <= i) reuse->held.resize(i + 1);
    at::Tensor& buf = reuse->held[i];
    const bool free = buf.defined() && buf.use_count() == 1 && buf.storage().use_count() == 1 &&
                      buf.scalar_type() == opts.dtype() && buf.numel() == rows * cols;
    if (!free) buf = at::empty({rows, cols}, opts);
    out.push_back(transposed ? buf.t() : mxd::is_bias(name) ? buf.view({cols}) : buf.view({rows, cols}));
    return buf.template data_ptr<T>();
  });
  return {std::move(s), std::move(out)};
}

// The rows of an activation [..., width] (its leading dimensions flattened, read in place),
// after checking its device, dtype, width and contiguity.
template <class T>
index_t rows_of(const at::Tensor& x, index_t width, const char* name) {
  MXD_CHECK(x.defined(), name, " is missing (None)");
  check_device(x, name);
  MXD_CHECK(x.scalar_type() == scalar_of<T>(), name, " has dtype ", c10::toString(x.scalar_type()),
            ", expected ", c10::toString(scalar_of<T>()));
  MXD_CHECK(x.dim() >= 1 && x.size(-1) == width, name, " has shape ", shape_str(x.sizes()),
            ", expected [..., ", width, "]");
  MXD_CHECK(x.is_contiguous(), name, " ", shape_str(x.sizes()), " has strides ",
            shape_str(x.strides()), " and must be contiguous (call .contiguous())");
  return x.numel() / width;
}

std::vector<std::int64_t> with_last(const at::Tensor& x, index_t last) {
  std::vector<std::int64_t> s = x.sizes().vec();
  s.back() = last;
  return s;
}

// The forward cache of one layer call (mxd's workspace), kept by autograd until backward.
struct Cache {
  mxd::Workspace<float> mxd_f;
  mxd::Workspace<double> mxd_d;
  mxd::TranscoderWorkspace<float> tc_f;
  mxd::TranscoderWorkspace<double> tc_d;
  bool transcoder = false;
  at::ScalarType dtype = at::kFloat;
  std::vector<std::int64_t> lead;  // x's leading dimensions
  bool filled = false;

  template <class T>
  auto& mxd_ws() {
    if constexpr (std::is_same_v<T, float>) return mxd_f;
    else return mxd_d;
  }
  template <class T>
  auto& tc_ws() {
    if constexpr (std::is_same_v<T, float>) return tc_f;
    else return tc_d;
  }

  // The last forward's selection: (indices int64, values) as [..., k (+ steering edits)].
  template <class T>
  std::pair<at::Tensor, at::Tensor> topk_t() {
    const mxd::Tensor<std::int32_t>* idx;
    mxd::View<const T> val;
    if (transcoder) {
      idx = &tc_ws<T>().topk_idx;
      val = tc_ws<T>().topk_val.view();
    } else {
      idx = &mxd_ws<T>().topk_idx;
      val = mxd_ws<T>().coefficients();
    }
    std::vector<std::int64_t> shape = lead;
    shape.push_back(idx->cols());
    at::Tensor i = at::empty(shape, at::kLong), v = at::empty(shape, scalar_of<T>());
    std::int64_t* ip = i.data_ptr<std::int64_t>();
    T* vp = v.data_ptr<T>();
    for (index_t n = 0; n < idx->size(); ++n) {
      ip[n] = (*idx)[n];
      vp[n] = val.data[n];
    }
    return {i, v};
  }
  py::tuple topk() {
    MXD_CHECK(filled, "no forward has run on this cache yet");
    auto r = dtype == at::kFloat ? topk_t<float>() : topk_t<double>();
    return py::make_tuple(r.first, r.second);
  }
};

// Returns f(T{}) with T the scalar type of `x` (float or double).
template <class F>
decltype(auto) by_dtype(const at::Tensor& x, const char* name, F&& f) {
  MXD_CHECK(x.defined(), name, " is missing (None)");
  if (x.scalar_type() == at::kFloat) return f(float{});
  MXD_CHECK(x.scalar_type() == at::kDouble, name, " has dtype ", c10::toString(x.scalar_type()),
            ": mxd_torch supports float32 and float64");
  return f(double{});
}

// The first parameter (W_enc), whose dtype is the layer's.
const at::Tensor& first(const std::vector<at::Tensor>& params) {
  MXD_CHECK(!params.empty(), "no parameters given");
  return params[0];
}

void start(Cache& cache, const at::Tensor& x, bool transcoder) {
  cache.transcoder = transcoder;
  cache.dtype = x.scalar_type();
  cache.lead = x.sizes().vec();
  cache.lead.pop_back();
  cache.filled = false;
}

// Steering edits as the Python side passes them (plain lists, so that torch.library ops can
// take them): op codes 0 add, 1 clamp, 2 zero, with their experts and values.
struct Edits {
  mxd::Steering steering;
  Edits(const std::vector<int>& ops, const std::vector<index_t>& experts,
        const std::vector<double>& values) {
    MXD_CHECK(ops.size() == experts.size() && ops.size() == values.size(), "steering: ",
              ops.size(), " ops, ", experts.size(), " experts and ", values.size(), " values");
    for (std::size_t i = 0; i < ops.size(); ++i) {
      MXD_CHECK(ops[i] >= 0 && ops[i] <= 2, "steering: unknown op code ", ops[i]);
      if (ops[i] == 0) steering.add(experts[i], values[i]);
      else if (ops[i] == 1) steering.clamp(experts[i], values[i]);
      else steering.zero(experts[i]);
    }
  }
  const mxd::Steering* get() const { return steering.edits.empty() ? nullptr : &steering; }
  index_t count() const { return static_cast<index_t>(steering.edits.size()); }
};

// The custom ops (torch.library) are functions of tensors, so there the forward cache lives in
// tensors the forward op returns and autograd saves; forward and backward bind a workspace of
// the calling thread (its scratch reused from call to call) to them for one call.
template <class W>
W& scratch() {
  thread_local W ws;
  return ws;
}

template <class V>
mxd::Tensor<V> borrow_2d(const at::Tensor& t) {
  return mxd::Tensor<V>::borrow(t.data_ptr<V>(), t.size(0), t.size(1));
}

// Fresh tensors of `shapes` (the one at `int_at` int32, mxd's top-k indices).
std::vector<at::Tensor> empty_saved(const std::vector<std::vector<std::int64_t>>& shapes,
                                    at::TensorOptions opts, std::size_t int_at) {
  std::vector<at::Tensor> out;
  for (std::size_t i = 0; i < shapes.size(); ++i)
    out.push_back(at::empty(shapes[i], i == int_at ? opts.dtype(at::kInt) : opts));
  return out;
}

// Checks tensors handed back to a backward op against what its forward op returned.
void check_saved(const std::vector<at::Tensor>& saved,
                 const std::vector<std::vector<std::int64_t>>& shapes, at::ScalarType dtype,
                 std::size_t int_at) {
  MXD_CHECK(saved.size() == shapes.size(), "backward: ", saved.size(),
            " saved tensors given, expected ", shapes.size());
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    const at::Tensor& t = saved[i];
    const std::string name = "saved tensor " + std::to_string(i);
    MXD_CHECK(t.defined(), name, " is missing (None)");
    check_device(t, name.c_str());
    MXD_CHECK(t.scalar_type() == (i == int_at ? at::kInt : dtype) && t.sizes().vec() == shapes[i] &&
                  t.is_contiguous(),
              name, " (", c10::toString(t.scalar_type()), " ", shape_str(t.sizes()),
              ") is not what the forward op returned: ", shape_str(shapes[i]));
  }
}

// The number of columns of the saved top-k (k + steering edits), read from the indices.
index_t saved_cols(const std::vector<at::Tensor>& saved, std::size_t idx_at, index_t k) {
  return saved.size() > idx_at && saved[idx_at].dim() == 2 ? saved[idx_at].size(1) : k;
}

// ---- MxD ----

// y = MxD(x) into ws's forward cache; x: [..., I] -> y: [..., O]. An empty batch gives an
// empty y (and an empty cache).
template <class T>
at::Tensor mxd_forward_ws(const mxd::Config& c, const std::vector<at::Tensor>& params,
                          const at::Tensor& x, mxd::Workspace<T>& ws, const Edits& edits,
                          int threads) {
  const index_t B = rows_of<T>(x, c.d_in, "x");
  const mxd::Params<T> p = borrow_set<mxd::Params<T>>(c, params, "MxD parameters");
  at::Tensor y = at::empty(with_last(x, c.d_out), x.options());
  ws.ctx.threads = threads;
  if (B == 0) {
    ws.prepare_forward(c, 0, edits.count());
    return y;
  }
  Compute run;
  mxd::forward<T>(p, {x.data_ptr<T>(), B, c.d_in}, {y.data_ptr<T>(), B, c.d_out}, ws, edits.get());
  return y;
}

// Gradients of L with dL/dy = dy for the forward cached in ws: (dx or None, [dL/dparam] in the
// parameters' order and layouts), in `buffers` where reuse_ok allows (no buffers: fresh).
// An empty batch gives zero gradients.
template <class T>
py::tuple mxd_backward_ws(const mxd::Config& c, const std::vector<at::Tensor>& params,
                          const at::Tensor& x, const at::Tensor& dy, mxd::Workspace<T>& ws,
                          bool need_dx, GradBuffers* buffers, const std::vector<bool>& reuse_ok,
                          int threads) {
  const index_t B = rows_of<T>(x, c.d_in, "x");
  MXD_CHECK(rows_of<T>(dy, c.d_out, "dy") == B, "dy has shape ", shape_str(dy.sizes()),
            " but x has ", B, " rows");
  const mxd::Params<T> p = borrow_set<mxd::Params<T>>(c, params, "MxD parameters");
  auto [g, grads] = allocate_set<mxd::Grads<T>>(c, x.options(), buffers, reuse_ok);
  at::Tensor dx = need_dx ? at::empty(x.sizes(), x.options()) : at::Tensor();
  if (B == 0) {
    for (at::Tensor& t : grads) t.zero_();
  } else {
    ws.ctx.threads = threads;
    Compute run;
    mxd::View<T> dxv = need_dx ? mxd::View<T>(dx.data_ptr<T>(), B, c.d_in) : mxd::View<T>();
    mxd::backward<T>(p, {x.data_ptr<T>(), B, c.d_in}, {dy.data_ptr<T>(), B, c.d_out}, ws, g, dxv);
  }
  return py::make_tuple(need_dx ? py::cast(dx) : py::none(), grads);
}

at::Tensor mxd_forward(const mxd::Config& c, const std::vector<at::Tensor>& params,
                       const at::Tensor& x, Cache& cache, const Edits& edits, int threads) {
  return by_dtype(first(params), "W_enc", [&](auto zero) {
    using T = decltype(zero);
    start(cache, x, false);
    at::Tensor y = mxd_forward_ws<T>(c, params, x, cache.mxd_ws<T>(), edits, threads);
    cache.filled = true;
    return y;
  });
}

py::tuple mxd_backward(const mxd::Config& c, const std::vector<at::Tensor>& params,
                       const at::Tensor& x, const at::Tensor& dy, Cache& cache, bool need_dx,
                       GradBuffers& buffers, const std::vector<bool>& reuse_ok, int threads) {
  return by_dtype(first(params), "W_enc", [&](auto zero) {
    using T = decltype(zero);
    MXD_CHECK(cache.filled && !cache.transcoder && cache.dtype == x.scalar_type(),
              "backward: the cache holds no MxD forward of this dtype");
    return mxd_backward_ws<T>(c, params, x, dy, cache.mxd_ws<T>(), need_dx, &buffers, reuse_ok,
                              threads);
  });
}

// The custom ops' MxD cache: hpre [B, H], g [B or 0 (no glu), H], z [B, H], u [B, O],
// v [B, O], topk_idx int32 [B, K], topk_val [B, K], coef [B or 0 (unsteered), K]; K = k + edits.
constexpr std::size_t mxd_idx_at = 5;
std::vector<std::vector<std::int64_t>> mxd_saved_shapes(const mxd::Config& c, index_t B, index_t K) {
  const index_t H = c.d_hidden, O = c.d_out;
  return {{B, H}, {c.glu ? B : 0, H}, {B, H}, {B, O}, {B, O}, {B, K}, {B, K}, {K > c.k ? B : 0, K}};
}

template <class T>
struct BoundMxd {
  mxd::Workspace<T>& ws;
  BoundMxd(const std::vector<at::Tensor>& s, index_t B) : ws(scratch<mxd::Workspace<T>>()) {
    ws.hpre = borrow_2d<T>(s[0]);
    ws.g = borrow_2d<T>(s[1]);
    ws.z = borrow_2d<T>(s[2]);
    ws.u = borrow_2d<T>(s[3]);
    ws.v = borrow_2d<T>(s[4]);
    ws.topk_idx = borrow_2d<std::int32_t>(s[5]);
    ws.topk_val = borrow_2d<T>(s[6]);
    ws.coef = borrow_2d<T>(s[7]);
    ws.batch = B;
    ws.steered = s[7].size(0) > 0;
  }
  ~BoundMxd() {
    for (auto* t : {&ws.hpre, &ws.g, &ws.z, &ws.u, &ws.v, &ws.topk_val, &ws.coef}) *t = {};
    ws.topk_idx = {};
    ws.batch = 0;
  }
};

// The forward op: (y, [the cache tensors]).
py::tuple mxd_forward_op(const mxd::Config& c, const std::vector<at::Tensor>& params,
                         const at::Tensor& x, const Edits& edits, int threads) {
  return by_dtype(first(params), "W_enc", [&](auto zero) {
    using T = decltype(zero);
    const index_t B = rows_of<T>(x, c.d_in, "x");
    std::vector<at::Tensor> saved =
        empty_saved(mxd_saved_shapes(c, B, c.k + edits.count()), x.options(), mxd_idx_at);
    BoundMxd<T> bound(saved, B);
    at::Tensor y = mxd_forward_ws<T>(c, params, x, bound.ws, edits, threads);
    return py::make_tuple(y, saved);
  });
}

// The backward op, over the forward op's cache tensors: (dx or None, [dL/dparam]), all fresh.
py::tuple mxd_backward_op(const mxd::Config& c, const std::vector<at::Tensor>& params,
                          const at::Tensor& x, const at::Tensor& dy,
                          const std::vector<at::Tensor>& saved, bool need_dx, int threads) {
  return by_dtype(first(params), "W_enc", [&](auto zero) {
    using T = decltype(zero);
    const index_t B = rows_of<T>(x, c.d_in, "x");
    const index_t K = saved_cols(saved, mxd_idx_at, c.k);
    check_saved(saved, mxd_saved_shapes(c, B, K), x.scalar_type(), mxd_idx_at);
    BoundMxd<T> bound(saved, B);
    return mxd_backward_ws<T>(c, params, x, dy, bound.ws, need_dx, nullptr, {}, threads);
  });
}

// ---- TopK / skip transcoders ----

template <class T>
at::Tensor transcoder_forward_ws(const mxd::TranscoderConfig& c, const std::vector<at::Tensor>& params,
                                 const at::Tensor& x, mxd::TranscoderWorkspace<T>& ws, int threads) {
  const index_t B = rows_of<T>(x, c.d_in, "x");
  const auto p = borrow_set<mxd::TranscoderParams<T>>(c, params, "transcoder parameters");
  at::Tensor y = at::empty(with_last(x, c.d_out), x.options());
  ws.ctx.threads = threads;
  if (B == 0) {
    ws.batch = 0;
    ws.topk_idx.resize(0, c.k, false);
    ws.topk_val.resize(0, c.k, false);
    return y;
  }
  Compute run;
  mxd::transcoder_forward<T>(p, {x.data_ptr<T>(), B, c.d_in}, {y.data_ptr<T>(), B, c.d_out}, ws);
  return y;
}

template <class T>
py::tuple transcoder_backward_ws(const mxd::TranscoderConfig& c, const std::vector<at::Tensor>& params,
                                 const at::Tensor& x, const at::Tensor& dy,
                                 mxd::TranscoderWorkspace<T>& ws, bool need_dx, GradBuffers* buffers,
                                 const std::vector<bool>& reuse_ok, int threads) {
  const index_t B = rows_of<T>(x, c.d_in, "x");
  MXD_CHECK(rows_of<T>(dy, c.d_out, "dy") == B, "dy has shape ", shape_str(dy.sizes()),
            " but x has ", B, " rows");
  const auto p = borrow_set<mxd::TranscoderParams<T>>(c, params, "transcoder parameters");
  auto [g, grads] = allocate_set<mxd::TranscoderParams<T>>(c, x.options(), buffers, reuse_ok);
  at::Tensor dx = need_dx ? at::empty(x.sizes(), x.options()) : at::Tensor();
  if (B == 0) {
    for (at::Tensor& t : grads) t.zero_();
  } else {
    ws.ctx.threads = threads;
    Compute run;
    mxd::View<T> dxv = need_dx ? mxd::View<T>(dx.data_ptr<T>(), B, c.d_in) : mxd::View<T>();
    mxd::transcoder_backward<T>(p, {x.data_ptr<T>(), B, c.d_in}, {dy.data_ptr<T>(), B, c.d_out},
                                ws, g, dxv);
  }
  return py::make_tuple(need_dx ? py::cast(dx) : py::none(), grads);
}

at::Tensor transcoder_forward(const mxd::TranscoderConfig& c, const std::vector<at::Tensor>& params,
                              const at::Tensor& x, Cache& cache, int threads) {
  return by_dtype(first(params), "W_enc", [&](auto zero) {
    using T = decltype(zero);
    start(cache, x, true);
    at::Tensor y = transcoder_forward_ws<T>(c, params, x, cache.tc_ws<T>(), threads);
    cache.filled = true;
    return y;
  });
}

py::tuple transcoder_backward(const mxd::TranscoderConfig& c, const std::vector<at::Tensor>& params,
                              const at::Tensor& x, const at::Tensor& dy, Cache& cache, bool need_dx,
                              GradBuffers& buffers, const std::vector<bool>& reuse_ok, int threads) {
  return by_dtype(first(params), "W_enc", [&](auto zero) {
    using T = decltype(zero);
    MXD_CHECK(cache.filled && cache.transcoder && cache.dtype == x.scalar_type(),
              "backward: the cache holds no transcoder forward of this dtype");
    return transcoder_backward_ws<T>(c, params, x, dy, cache.tc_ws<T>(), need_dx, &buffers,
                                     reuse_ok, threads);
  });
}

// The custom ops' transcoder cache: topk_idx int32 [B, k], topk_val [B, k].
constexpr std::size_t tc_idx_at = 0;
std::vector<std::vector<std::int64_t>> tc_saved_shapes(const mxd::TranscoderConfig& c, index_t B) {
  return {{B, c.k}, {B, c.k}};
}

template <class T>
struct BoundTranscoder {
  mxd::TranscoderWorkspace<T>& ws;
  BoundTranscoder(const std::vector<at::Tensor>& s, index_t B)
      : ws(scratch<mxd::TranscoderWorkspace<T>>()) {
    ws.topk_idx = borrow_2d<std::int32_t>(s[0]);
    ws.topk_val = borrow_2d<T>(s[1]);
    ws.batch = B;
  }
  ~BoundTranscoder() {
    ws.topk_idx = {};
    ws.topk_val = {};
    ws.batch = 0;
  }
};

py::tuple transcoder_forward_op(const mxd::TranscoderConfig& c, const std::vector<at::Tensor>& params,
                                const at::Tensor& x, int threads) {
  return by_dtype(first(params), "W_enc", [&](auto zero) {
    using T = decltype(zero);
    const index_t B = rows_of<T>(x, c.d_in, "x");
    std::vector<at::Tensor> saved = empty_saved(tc_saved_shapes(c, B), x.options(), tc_idx_at);
    BoundTranscoder<T> bound(saved, B);
    at::Tensor y = transcoder_forward_ws<T>(c, params, x, bound.ws, threads);
    return py::make_tuple(y, saved);
  });
}

py::tuple transcoder_backward_op(const mxd::TranscoderConfig& c, const std::vector<at::Tensor>& params,
                                 const at::Tensor& x, const at::Tensor& dy,
                                 const std::vector<at::Tensor>& saved, bool need_dx, int threads) {
  return by_dtype(first(params), "W_enc", [&](auto zero) {
    using T = decltype(zero);
    const index_t B = rows_of<T>(x, c.d_in, "x");
    check_saved(saved, tc_saved_shapes(c, B), x.scalar_type(), tc_idx_at);
    BoundTranscoder<T> bound(saved, B);
    return transcoder_backward_ws<T>(c, params, x, dy, bound.ws, need_dx, nullptr, {}, threads);
  });
}

// ---- Initialisation and files ----

at::ScalarType dtype_arg(const std::string& dtype) {
  if (dtype == "float32") return at::kFloat;
  MXD_CHECK(dtype == "float64", "dtype ", dtype, ": mxd_torch supports float32 and float64");
  return at::kDouble;
}

// Returns f(T{}) for a dtype_arg() result: float for kFloat, else double.
template <class F>
decltype(auto) by_scalar(at::ScalarType t, F&& f) {
  if (t == at::kFloat) return f(float{});
  return f(double{});
}

// The authors' initialisation (mxd::init_params), written into fresh torch tensors; without
// a seed the tensors are left unwritten (their layouts, for a layer on the meta device).
std::vector<at::Tensor> mxd_init(const mxd::Config& c, std::optional<std::uint64_t> seed,
                                 const std::string& dtype) {
  return by_scalar(dtype_arg(dtype), [&](auto zero) {
    using T = decltype(zero);
    auto [p, tensors] = allocate_set<mxd::Params<T>>(c, at::TensorOptions(scalar_of<T>()));
    if (seed) mxd::init_params(p, *seed);
    return tensors;
  });
}

std::vector<at::Tensor> transcoder_init(const mxd::TranscoderConfig& c,
                                        std::optional<std::uint64_t> seed, const std::string& dtype) {
  return by_scalar(dtype_arg(dtype), [&](auto zero) {
    using T = decltype(zero);
    auto [p, tensors] = allocate_set<mxd::TranscoderParams<T>>(c, at::TensorOptions(scalar_of<T>()));
    if (seed) mxd::init_transcoder(p, *seed);
    return tensors;
  });
}

// Reads a saved parameter set with mxd's reader straight into fresh torch tensors.
template <template <class, class> class SetT, class Config>
std::vector<at::Tensor> read_set(mxd::io::SafetensorsReader& f, const Config& c, at::ScalarType dtype) {
  return by_scalar(dtype, [&](auto zero) {
    using T = decltype(zero);
    using Set = SetT<T, mxd::cpu>;
    auto [p, tensors] = allocate_set<Set>(c, at::TensorOptions(scalar_of<T>()));
    p.for_each([&](const char* name, mxd::Tensor<T>& t) {
      mxd::io::read_file_layout<Set>(f, name, name, t);
    });
    return tensors;
  });
}

py::tuple mxd_load(const std::string& path, const std::string& dtype) {
  const at::ScalarType t = dtype_arg(dtype);
  py::gil_scoped_release nogil;
  mxd::io::SafetensorsReader f(path);
  const mxd::Config c = mxd::io::read_config(f);
  std::vector<at::Tensor> tensors = read_set<mxd::Params>(f, c, t);
  py::gil_scoped_acquire gil;
  return py::make_tuple(c, tensors);
}

py::tuple transcoder_load(const std::string& path, const std::string& dtype) {
  const at::ScalarType t = dtype_arg(dtype);
  py::gil_scoped_release nogil;
  mxd::io::SafetensorsReader f(path);
  const mxd::TranscoderConfig c = mxd::io::read_transcoder_config(f);
  std::vector<at::Tensor> tensors = read_set<mxd::TranscoderParams>(f, c, t);
  py::gil_scoped_acquire gil;
  return py::make_tuple(c, tensors);
}

// Writes the parameters (in their dtype) with their config, atomically, as `mxd train` does.
void mxd_save(const std::string& path, const mxd::Config& c, const std::vector<at::Tensor>& params) {
  by_dtype(first(params), "W_enc", [&](auto zero) {
    using T = decltype(zero);
    const mxd::Params<T> p = borrow_set<mxd::Params<T>>(c, params, "MxD parameters");
    py::gil_scoped_release nogil;
    mxd::io::save_checkpoint(path, p);
    return 0;
  });
}

void transcoder_save(const std::string& path, const mxd::TranscoderConfig& c,
                     const std::vector<at::Tensor>& params) {
  by_dtype(first(params), "W_enc", [&](auto zero) {
    using T = decltype(zero);
    const auto p = borrow_set<mxd::TranscoderParams<T>>(c, params, "transcoder parameters");
    py::gil_scoped_release nogil;
    mxd::io::save_checkpoint(path, p);
    return 0;
  });
}

// Every tensor of a safetensors file (floats as float64, integers as int64) and its metadata,
// read with mxd's own reader.
py::tuple read_safetensors(const std::string& path) {
  mxd::io::SafetensorsReader f(path);
  py::dict tensors;
  for (const std::string& name : f.names()) {
    const mxd::io::TensorInfo& info = f.info(name);
    const bool is_float = info.dtype == mxd::io::DType::F64 || info.dtype == mxd::io::DType::F32 ||
                          info.dtype == mxd::io::DType::F16 || info.dtype == mxd::io::DType::BF16;
    at::Tensor t = at::empty(info.shape, is_float ? at::kDouble : at::kLong);
    if (is_float) f.read<double>(name, t.data_ptr<double>(), 0, info.numel());
    else f.read<std::int64_t>(name, t.data_ptr<std::int64_t>(), 0, info.numel());
    tensors[py::str(name)] = t;
  }
  return py::make_tuple(tensors, f.metadata());
}

// ---- AdamW ----

// mxd::AdamW over torch's parameters and gradients; its moments live in mxd.
struct Optimizer {
  virtual ~Optimizer() = default;
  virtual void step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                    int threads) = 0;
  virtual long long steps() const = 0;
};

template <class T, class Set, class Config>
struct OptimizerT : Optimizer {
  Config config;
  mxd::AdamW<T, mxd::cpu, Set> opt;
  OptimizerT(const Config& c, const Set& p, const mxd::AdamWConfig& oc) : config(c), opt(p, oc) {}
  void step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
            int threads) override {
    Set p = borrow_set<Set>(config, params, "parameters");
    const Set g = borrow_set<Set>(config, grads, "gradients");
    mxd::Context<mxd::cpu> ctx;
    ctx.threads = threads;
    {
      Compute run;
      opt.step(p, g, ctx);
    }
    // Written through raw memory: tell autograd, as torch's in-place updates do.
    for (const at::Tensor& t : params) t.unsafeGetTensorImpl()->bump_version();
  }
  long long steps() const override { return opt.t; }
};

template <template <class, class> class SetT, class Config>
std::unique_ptr<Optimizer> make_optimizer(const Config& c, const std::vector<at::Tensor>& params,
                                          const mxd::AdamWConfig& oc) {
  return by_dtype(first(params), "W_enc", [&](auto zero) -> std::unique_ptr<Optimizer> {
    using T = decltype(zero);
    using Set = SetT<T, mxd::cpu>;
    return std::make_unique<OptimizerT<T, Set, Config>>(c, borrow_set<Set>(c, params, "parameters"), oc);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mxd_torch's C++ adapter over the header-only mxd library (use the mxd_torch package)";
  static py::exception<mxd::Error> error(m, "Error", PyExc_RuntimeError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const mxd::Error& e) {
      error(e.what());
    }
  });

  py::class_<mxd::Config>(m, "Config")
      .def(py::init([](index_t d_in, index_t d_hidden, index_t d_out, index_t n_experts, index_t k,
                       const std::string& activation, bool glu, bool skip) {
             mxd::Config c;
             c.d_in = d_in; c.d_hidden = d_hidden; c.d_out = d_out; c.n_experts = n_experts;
             c.k = k; c.activation = mxd::parse_activation(activation); c.glu = glu; c.skip = skip;
             c.validate();
             return c;
           }),
           py::arg("d_in"), py::arg("d_hidden"), py::arg("d_out"), py::arg("n_experts"),
           py::arg("k"), py::arg("activation"), py::arg("glu"), py::arg("skip"))
      .def_readonly("d_in", &mxd::Config::d_in)
      .def_readonly("d_hidden", &mxd::Config::d_hidden)
      .def_readonly("d_out", &mxd::Config::d_out)
      .def_readonly("n_experts", &mxd::Config::n_experts)
      .def_readonly("k", &mxd::Config::k)
      .def_property_readonly("activation", [](const mxd::Config& c) { return mxd::activation_name(c.activation); })
      .def_readonly("glu", &mxd::Config::glu)
      .def_readonly("skip", &mxd::Config::skip)
      .def("n_params", &mxd::Config::n_params)
      .def(py::pickle(
          [](const mxd::Config& c) {
            return py::make_tuple(c.d_in, c.d_hidden, c.d_out, c.n_experts, c.k,
                                  mxd::activation_name(c.activation), c.glu, c.skip);
          },
          [](const py::tuple& t) {
            mxd::Config c;
            c.d_in = t[0].cast<index_t>(); c.d_hidden = t[1].cast<index_t>();
            c.d_out = t[2].cast<index_t>(); c.n_experts = t[3].cast<index_t>();
            c.k = t[4].cast<index_t>(); c.activation = mxd::parse_activation(t[5].cast<std::string>());
            c.glu = t[6].cast<bool>(); c.skip = t[7].cast<bool>();
            c.validate();
            return c;
          }))
      .def("names", [](const mxd::Config& c) {
        std::vector<std::string> names;
        mxd::Params<float> empty;
        empty.config = c;
        empty.for_each([&](const char* name, const mxd::Tensor<float>&) { names.push_back(name); });
        return names;
      });

  py::class_<mxd::TranscoderConfig>(m, "TranscoderConfig")
      .def(py::init([](index_t d_in, index_t d_out, index_t n_latents, index_t k, bool skip) {
             mxd::TranscoderConfig c{d_in, d_out, n_latents, k, skip};
             c.validate();
             return c;
           }),
           py::arg("d_in"), py::arg("d_out"), py::arg("n_latents"), py::arg("k"), py::arg("skip"))
      .def_readonly("d_in", &mxd::TranscoderConfig::d_in)
      .def_readonly("d_out", &mxd::TranscoderConfig::d_out)
      .def_readonly("n_latents", &mxd::TranscoderConfig::n_latents)
      .def_readonly("k", &mxd::TranscoderConfig::k)
      .def_readonly("skip", &mxd::TranscoderConfig::skip)
      .def("n_params", &mxd::TranscoderConfig::n_params)
      .def(py::pickle(
          [](const mxd::TranscoderConfig& c) {
            return py::make_tuple(c.d_in, c.d_out, c.n_latents, c.k, c.skip);
          },
          [](const py::tuple& t) {
            mxd::TranscoderConfig c{t[0].cast<index_t>(), t[1].cast<index_t>(), t[2].cast<index_t>(),
                                    t[3].cast<index_t>(), t[4].cast<bool>()};
            c.validate();
            return c;
          }))
      .def("names", [](const mxd::TranscoderConfig& c) {
        std::vector<std::string> names{"W_enc", "b_enc", "W_dec", "b_dec_out"};
        if (c.skip) names.push_back("W_skip.weight");
        return names;
      });

  py::class_<Edits>(m, "Edits", "Steering edits (mxd_torch.Steering's lists) as mxd::Steering")
      .def(py::init<const std::vector<int>&, const std::vector<index_t>&, const std::vector<double>&>(),
           py::arg("ops"), py::arg("experts"), py::arg("values"));

  py::class_<Cache>(m, "Cache").def(py::init<>()).def("topk", &Cache::topk);
  py::class_<GradBuffers>(m, "GradBuffers").def(py::init<>());

  py::class_<Optimizer>(m, "AdamW")
      .def(py::init([](py::object config, const std::vector<at::Tensor>& params, double lr,
                       double beta1, double beta2, double eps, double weight_decay,
                       long long warmup_steps) {
             mxd::AdamWConfig oc;
             oc.lr = lr; oc.beta1 = beta1; oc.beta2 = beta2; oc.eps = eps;
             oc.weight_decay = weight_decay; oc.warmup_steps = warmup_steps;
             if (py::isinstance<mxd::Config>(config))
               return make_optimizer<mxd::Params>(config.cast<mxd::Config>(), params, oc);
             return make_optimizer<mxd::TranscoderParams>(config.cast<mxd::TranscoderConfig>(), params, oc);
           }),
           py::arg("config"), py::arg("params"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"),
           py::arg("eps"), py::arg("weight_decay"), py::arg("warmup_steps"))
      .def("step", &Optimizer::step, py::arg("params"), py::arg("grads"), py::arg("threads"))
      .def_property_readonly("steps", &Optimizer::steps);

  m.def("mxd_forward", &mxd_forward, py::arg("config"), py::arg("params"), py::arg("x"),
        py::arg("cache"), py::arg("edits"), py::arg("threads"));
  m.def("mxd_backward", &mxd_backward, py::arg("config"), py::arg("params"), py::arg("x"),
        py::arg("dy"), py::arg("cache"), py::arg("need_dx"), py::arg("buffers"),
        py::arg("reuse_ok"), py::arg("threads"));
  m.def("transcoder_forward", &transcoder_forward, py::arg("config"), py::arg("params"),
        py::arg("x"), py::arg("cache"), py::arg("threads"));
  m.def("transcoder_backward", &transcoder_backward, py::arg("config"), py::arg("params"),
        py::arg("x"), py::arg("dy"), py::arg("cache"), py::arg("need_dx"), py::arg("buffers"),
        py::arg("reuse_ok"), py::arg("threads"));
  m.def("mxd_forward_op", &mxd_forward_op, py::arg("config"), py::arg("params"), py::arg("x"),
        py::arg("edits"), py::arg("threads"));
  m.def("mxd_backward_op", &mxd_backward_op, py::arg("config"), py::arg("params"), py::arg("x"),
        py::arg("dy"), py::arg("saved"), py::arg("need_dx"), py::arg("threads"));
  m.def("transcoder_forward_op", &transcoder_forward_op, py::arg("config"), py::arg("params"),
        py::arg("x"), py::arg("threads"));
  m.def("transcoder_backward_op", &transcoder_backward_op, py::arg("config"), py::arg("params"),
        py::arg("x"), py::arg("dy"), py::arg("saved"), py::arg("need_dx"), py::arg("threads"));
  m.def("mxd_init", &mxd_init, py::arg("config"), py::arg("seed"), py::arg("dtype"));
  m.def("transcoder_init", &transcoder_init, py::arg("config"), py::arg("seed"), py::arg("dtype"));
  m.def("mxd_load", &mxd_load, py::arg("path"), py::arg("dtype"));
  m.def("transcoder_load", &transcoder_load, py::arg("path"), py::arg("dtype"));
  m.def("mxd_save", &mxd_save, py::arg("path"), py::arg("config"), py::arg("params"));
  m.def("transcoder_save", &transcoder_save, py::arg("path"), py::arg("config"), py::arg("params"));
  m.def("read_safetensors", &read_safetensors, py::arg("path"));
  m.def("matched_experts", [](index_t d_in, index_t d_hidden, index_t d_out, index_t m, bool glu,
                              bool skip) { return mxd::matched_experts(d_in, d_hidden, d_out, m, glu, skip); },
        py::arg("d_in"), py::arg("d_hidden"), py::arg("d_out"), py::arg("m"), py::arg("glu") = false,
        py::arg("skip") = false);
}
