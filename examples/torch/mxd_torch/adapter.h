// SPDX-License-Identifier: MIT
// mxd_torch's adapter from torch tensors to mxd, written once over the device (mxd::cpu in
// _ext.cpp, mxd::cuda in _ext_cuda.cu) and the model (MxD or transcoder, told apart by their
// config type: Model<mxd::Config>, Model<mxd::TranscoderConfig>). Parameters, gradients and
// activations stay in torch's memory; mxd borrows them (Tensor::borrow, Params::borrow).
// Everything here checks shapes, dtypes, devices and layouts and binds memory; the math is
// mxd::forward and mxd::backward, the same for every model.
//
// Layouts: torch holds every parameter under the authors' name and shape. The one matrix mxd
// keeps transposed (MxD's W_cond [O, N] = C^T, the transcoder's W_enc [I, M]) is created by
// the Python side as the transpose of a contiguous tensor in mxd's layout, so its memory is
// mxd's and no call ever copies it; the autograd gradient of that parameter gets the same
// strides, so AccumulateGrad and torch's optimizers keep the layout too.
//
// The includer provides backend<Device> (<mxd/mxd.hpp> or <mxd/cuda.cuh>) first.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <mxd/baselines/transcoder.hpp>
#include <mxd/layer.hpp>
#include <mxd/optim.hpp>
#include <mxd/steering.hpp>

namespace mxd_torch {

using mxd::index_t;

template <class T>
constexpr at::ScalarType scalar_of() {
  if constexpr (std::is_same_v<T, float>) return at::kFloat;
  else if constexpr (std::is_same_v<T, double>) return at::kDouble;
  else return at::kInt;  // std::int32_t: top-k indices
}

inline std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (std::size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// Every tensor of one call must be on the parameters' device.
inline void check_device(const at::Tensor& t, const char* name, const at::Device& device) {
  MXD_CHECK(t.device() == device, name, " is on ", t.device().str(), " but the parameters are on ",
            device.str(), ": mxd_torch does not mix devices (move it with .to('", device.str(),
            "'))");
}

// The memory of parameter `name`, which mxd sees as row-major [rows, cols]. On the torch
// side it is [rows, cols] contiguous, [cols] for a bias, or, when `transposed`, [cols, rows]
// with strides (1, cols): the transpose of mxd's contiguous matrix.
template <class T>
T* borrow_memory(const at::Tensor& t, const char* name, index_t rows, index_t cols,
                 bool transposed, const at::Device& device) {
  MXD_CHECK(t.defined(), name, " is missing (None)");
  check_device(t, name, device);
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
inline at::Tensor empty_like_param(const char* name, index_t rows, index_t cols, bool transposed,
                                   at::TensorOptions opts) {
  if (transposed) return at::empty({rows, cols}, opts).t();
  if (mxd::is_bias(name)) return at::empty({cols}, opts);
  return at::empty({rows, cols}, opts);
}

// The element type of an mxd::Tensor.
template <class X>
struct element_of;
template <class T, class D>
struct element_of<mxd::Tensor<T, D>> {
  using type = T;
};

// Binds a parameter set over torch tensors given in the set's order (Params::borrow and
// TranscoderParams::borrow call `memory` in that order), all on `device`.
template <class Set, class Config>
Set borrow_set(const Config& c, const std::vector<at::Tensor>& tensors, const char* what,
               const at::Device& device) {
  using T = typename Set::Scalar;
  std::size_t i = 0;
  Set s = Set::borrow(c, [&](const char* name, index_t rows, index_t cols) {
    MXD_CHECK(i < tensors.size(), what, ": ", tensors.size(), " tensors given, but ", name,
              " is number ", i + 1);
    return borrow_memory<T>(tensors[i++], name, rows, cols, Set::transposed_in_file(name), device);
  });
  MXD_CHECK(i == tensors.size(), what, ": ", tensors.size(), " tensors given, expected ", i);
  return s;
}

// Gradient memory kept from one backward to the next. Fresh host memory costs page faults
// (about 70 ms of CPU for GPT-2 small's 38 M gradients, a quarter of a training step), so a
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
  using T = typename Set::Scalar;
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
                      buf.scalar_type() == opts.dtype() && buf.device() == opts.device() &&
                      buf.numel() == rows * cols;
    if (!free) buf = at::empty({rows, cols}, opts);
    out.push_back(transposed ? buf.t() : mxd::is_bias(name) ? buf.view({cols}) : buf.view({rows, cols}));
    return buf.template data_ptr<T>();
  });
  return {std::move(s), std::move(out)};
}

// The rows of an activation [..., width] (its leading dimensions flattened, read in place),
// after checking its device, dtype, width and contiguity.
template <class T>
index_t rows_of(const at::Tensor& x, index_t width, const char* name, const at::Device& device) {
  MXD_CHECK(x.defined(), name, " is missing (None)");
  check_device(x, name, device);
  MXD_CHECK(x.scalar_type() == scalar_of<T>(), name, " has dtype ", c10::toString(x.scalar_type()),
            ", expected ", c10::toString(scalar_of<T>()));
  MXD_CHECK(x.dim() >= 1 && x.size(-1) == width, name, " has shape ", shape_str(x.sizes()),
            ", expected [..., ", width, "]");
  MXD_CHECK(x.is_contiguous(), name, " ", shape_str(x.sizes()), " has strides ",
            shape_str(x.strides()), " and must be contiguous (call .contiguous())");
  return x.numel() / width;
}

inline std::vector<std::int64_t> with_last(const at::Tensor& x, index_t last) {
  std::vector<std::int64_t> s = x.sizes().vec();
  s.back() = last;
  return s;
}

// Returns f(T{}) with T the scalar type of `x` (float or double).
template <class F>
decltype(auto) by_dtype(const at::Tensor& x, const char* name, F&& f) {
  MXD_CHECK(x.defined(), name, " is missing (None)");
  if (x.scalar_type() == at::kFloat) return f(float{});
  MXD_CHECK(x.scalar_type() == at::kDouble, name, " has dtype ", c10::toString(x.scalar_type()),
            ": mxd_torch supports float32 and float64");
  return f(double{});
}

// The first parameter (W_enc), whose dtype and device are the layer's.
inline const at::Tensor& first(const std::vector<at::Tensor>& params) {
  MXD_CHECK(!params.empty(), "no parameters given");
  return params[0];
}

// ---- The models ----

// What differs between the MxD and the transcoders: their parameter set and workspace, the
// forward cache that backward reads (its tensors, which the custom ops return and autograd
// saves, in this order: _ops.py's fake kernels list the same shapes), and steering (MxD only).
// K is the number of selected columns: k, plus one per steering edit.
template <class Config>
struct Model;

template <>
struct Model<mxd::Config> {
  template <class T, class D>
  using Params = mxd::Params<T, D>;
  template <class T, class D>
  using Workspace = mxd::Workspace<T, D>;
  static constexpr const char* params_name = "MxD parameters";
  // Positions in the cache: the top-k indices, the gate values, the coefficients mixed
  // (steered forwards only; else the gate values are).
  static constexpr std::size_t idx_at = 5, val_at = 6, coef_at = 7;

  // f(tensor, rows, cols) for hpre [B, H], g [B or 0 (no glu), H], z [B, H], u [B, O],
  // v [B, O], topk_idx int32 [B, K], topk_val [B, K], coef [B or 0 (unsteered), K].
  template <class W, class F>
  static void cache(W& ws, const mxd::Config& c, index_t B, index_t K, F&& f) {
    const index_t H = c.d_hidden, O = c.d_out;
    f(ws.hpre, B, H);
    f(ws.g, c.glu ? B : 0, H);
    f(ws.z, B, H);
    f(ws.u, B, O);
    f(ws.v, B, O);
    f(ws.topk_idx, B, K);
    f(ws.topk_val, B, K);
    f(ws.coef, K > c.k ? B : 0, K);
  }
  template <class W>
  static void set_batch(W& ws, const mxd::Config& c, index_t B, index_t K) {
    ws.batch = B;
    ws.steered = K > c.k;
  }
  template <class W>
  static auto coefficients(W& ws) {
    return ws.coefficients();
  }
  template <class T, class D>
  static void forward(const Params<T, D>& p, mxd::InView<T, D> x, mxd::View<T, D> y,
                      Workspace<T, D>& ws, const mxd::Steering* steering) {
    mxd::forward(p, x, y, ws, steering);
  }
};

template <>
struct Model<mxd::TranscoderConfig> {
  template <class T, class D>
  using Params = mxd::TranscoderParams<T, D>;
  template <class T, class D>
  using Workspace = mxd::TranscoderWorkspace<T, D>;
  static constexpr const char* params_name = "transcoder parameters";
  static constexpr std::size_t idx_at = 0, val_at = 1, coef_at = 1;

  // f(tensor, rows, cols) for topk_idx int32 [B, k], topk_val [B, k].
  template <class W, class F>
  static void cache(W& ws, const mxd::TranscoderConfig&, index_t B, index_t K, F&& f) {
    f(ws.topk_idx, B, K);
    f(ws.topk_val, B, K);
  }
  template <class W>
  static void set_batch(W& ws, const mxd::TranscoderConfig&, index_t B, index_t) {
    ws.batch = B;
  }
  template <class W>
  static auto coefficients(W& ws) {
    return ws.topk_val.view();
  }
  template <class T, class D>
  static void forward(const Params<T, D>& p, mxd::InView<T, D> x, mxd::View<T, D> y,
                      Workspace<T, D>& ws, const mxd::Steering* steering) {
    MXD_CHECK(!steering, "steering edits MxD layers only, not transcoders");
    mxd::forward(p, x, y, ws);
  }
};

// ---- Forward and backward, for every model and device ----

// y = model(x) into ws's forward cache; x: [..., I] -> y: [..., O], all on the parameters'
// device. An empty batch gives an empty y (and an empty cache). The caller has set up ws.ctx
// (threads, or stream and math mode).
template <class Config, class T, class D>
at::Tensor forward_into(const Config& c, const std::vector<at::Tensor>& params, const at::Tensor& x,
                        typename Model<Config>::template Workspace<T, D>& ws,
                        const mxd::Steering* steering, index_t K) {
  using M = Model<Config>;
  const at::Device device = params.at(0).device();
  const index_t B = rows_of<T>(x, c.d_in, "x", device);
  const auto p = borrow_set<typename M::template Params<T, D>>(c, params, M::params_name, device);
  at::Tensor y = at::empty(with_last(x, c.d_out), x.options());
  if (B == 0) {
    M::cache(ws, c, 0, K, [](auto& t, index_t rows, index_t cols) { t.resize(rows, cols, false); });
    M::set_batch(ws, c, 0, K);
    return y;
  }
  M::forward(p, {x.data_ptr<T>(), B, c.d_in}, {y.data_ptr<T>(), B, c.d_out}, ws, steering);
  return y;
}

// Gradients of L with dL/dy = dy for the forward cached in ws: (dx, or an undefined tensor
// without need_dx; [dL/dparam] in the parameters' order and layouts), in `buffers` where
// reuse_ok allows (no buffers: fresh). An empty batch gives zero gradients.
template <class Config, class T, class D>
std::pair<at::Tensor, std::vector<at::Tensor>> backward_from(
    const Config& c, const std::vector<at::Tensor>& params, const at::Tensor& x, const at::Tensor& dy,
    typename Model<Config>::template Workspace<T, D>& ws, bool need_dx, GradBuffers* buffers,
    const std::vector<bool>& reuse_ok) {
  using M = Model<Config>;
  using Set = typename M::template Params<T, D>;
  const at::Device device = params.at(0).device();
  const index_t B = rows_of<T>(x, c.d_in, "x", device);
  MXD_CHECK(rows_of<T>(dy, c.d_out, "dy", device) == B, "dy has shape ", shape_str(dy.sizes()),
            " but x has ", B, " rows");
  const Set p = borrow_set<Set>(c, params, M::params_name, device);
  auto [g, grads] = allocate_set<Set>(c, x.options(), buffers, reuse_ok);
  at::Tensor dx = need_dx ? at::empty(x.sizes(), x.options()) : at::Tensor();
  if (B == 0) {
    for (at::Tensor& t : grads) t.zero_();
  } else {
    mxd::View<T, D> dxv = need_dx ? mxd::View<T, D>(dx.data_ptr<T>(), B, c.d_in) : mxd::View<T, D>();
    mxd::backward(p, mxd::View<const T, D>(x.data_ptr<T>(), B, c.d_in),
                  mxd::View<const T, D>(dy.data_ptr<T>(), B, c.d_out), ws, g, dxv);
  }
  return {dx, std::move(grads)};
}

// ---- The forward cache as tensors (the custom ops, and every CUDA call) ----

// The dtypes and shapes of the cache tensors for B rows and K selected columns.
struct SavedSpec {
  std::vector<at::ScalarType> dtypes;
  std::vector<std::vector<std::int64_t>> shapes;
};

template <class Config, class W>
SavedSpec saved_spec(W& ws, const Config& c, index_t B, index_t K, at::ScalarType dtype) {
  SavedSpec s;
  Model<Config>::cache(ws, c, B, K, [&](auto& t, index_t rows, index_t cols) {
    using E = typename element_of<std::decay_t<decltype(t)>>::type;
    s.dtypes.push_back(std::is_same_v<E, std::int32_t> ? at::kInt : dtype);
    s.shapes.push_back({rows, cols});
  });
  return s;
}

// Fresh tensors for the cache of B rows and K columns, on x's device.
template <class Config, class W>
std::vector<at::Tensor> empty_saved(W& ws, const Config& c, index_t B, index_t K, const at::Tensor& x) {
  const SavedSpec s = saved_spec(ws, c, B, K, x.scalar_type());
  std::vector<at::Tensor> out;
  for (std::size_t i = 0; i < s.shapes.size(); ++i)
    out.push_back(at::empty(s.shapes[i], x.options().dtype(s.dtypes[i])));
  return out;
}

// K as the cache tensors handed back to a backward say it (the indices' columns).
template <class Config>
index_t saved_cols(const std::vector<at::Tensor>& saved, const Config& c) {
  const std::size_t at = Model<Config>::idx_at;
  return saved.size() > at && saved[at].defined() && saved[at].dim() == 2 ? saved[at].size(1) : c.k;
}

// Checks tensors handed back to a backward against what the forward returned.
template <class Config, class W>
void check_saved(W& ws, const Config& c, const std::vector<at::Tensor>& saved, index_t B,
                 at::ScalarType dtype, const at::Device& device) {
  const SavedSpec s = saved_spec(ws, c, B, saved_cols(saved, c), dtype);
  MXD_CHECK(saved.size() == s.shapes.size(), "backward: ", saved.size(),
            " saved tensors given, expected ", s.shapes.size());
  for (std::size_t i = 0; i < s.shapes.size(); ++i) {
    const at::Tensor& t = saved[i];
    const std::string name = "saved tensor " + std::to_string(i);
    MXD_CHECK(t.defined(), name, " is missing (None)");
    check_device(t, name.c_str(), device);
    MXD_CHECK(t.scalar_type() == s.dtypes[i] && t.sizes().vec() == s.shapes[i] && t.is_contiguous(),
              name, " (", c10::toString(t.scalar_type()), " ", shape_str(t.sizes()),
              ") is not what the forward returned: ", shape_str(s.shapes[i]));
  }
}

// A workspace whose forward cache is the memory of `saved` for one call (its scratch stays
// its own); afterwards the workspace lets go of that memory.
template <class Config, class W>
class Bound {
public:
  Bound(W& ws, const Config& c, const std::vector<at::Tensor>& saved, index_t B, index_t K)
      : ws_(ws), c_(c) {
    std::size_t i = 0;
    Model<Config>::cache(ws, c, B, K, [&](auto& t, index_t rows, index_t cols) {
      using Tensor = std::decay_t<decltype(t)>;
      using E = typename element_of<Tensor>::type;
      t = Tensor::borrow(saved.at(i++).template data_ptr<E>(), rows, cols);
    });
    Model<Config>::set_batch(ws, c, B, K);
  }
  ~Bound() {
    Model<Config>::cache(ws_, c_, 0, 0, [](auto& t, index_t, index_t) { t = {}; });
    Model<Config>::set_batch(ws_, c_, 0, c_.k);
  }
  Bound(const Bound&) = delete;
  Bound& operator=(const Bound&) = delete;

private:
  W& ws_;
  Config c_;
};

// The forward with its cache in fresh tensors: (y, [the cache tensors]). ws supplies the
// scratch (and the context, set up by the caller).
template <class Config, class T, class D>
std::pair<at::Tensor, std::vector<at::Tensor>> forward_saved(
    const Config& c, const std::vector<at::Tensor>& params, const at::Tensor& x,
    typename Model<Config>::template Workspace<T, D>& ws, const mxd::Steering* steering, index_t K) {
  const index_t B = rows_of<T>(x, c.d_in, "x", params.at(0).device());
  std::vector<at::Tensor> saved = empty_saved(ws, c, B, K, x);
  Bound<Config, std::decay_t<decltype(ws)>> bound(ws, c, saved, B, K);
  at::Tensor y = forward_into<Config, T, D>(c, params, x, ws, steering, K);
  return {y, std::move(saved)};
}

// The backward over forward_saved's cache tensors.
template <class Config, class T, class D>
std::pair<at::Tensor, std::vector<at::Tensor>> backward_saved(
    const Config& c, const std::vector<at::Tensor>& params, const at::Tensor& x, const at::Tensor& dy,
    const std::vector<at::Tensor>& saved, typename Model<Config>::template Workspace<T, D>& ws,
    bool need_dx, GradBuffers* buffers, const std::vector<bool>& reuse_ok) {
  const at::Device device = params.at(0).device();
  const index_t B = rows_of<T>(x, c.d_in, "x", device);
  check_saved(ws, c, saved, B, x.scalar_type(), device);
  Bound<Config, std::decay_t<decltype(ws)>> bound(ws, c, saved, B, saved_cols(saved, c));
  return backward_from<Config, T, D>(c, params, x, dy, ws, need_dx, buffers, reuse_ok);
}

// ---- AdamW ----

// mxd::AdamW over torch's parameters and gradients; its moments live in mxd (on the
// parameters' device).
struct Optimizer {
  virtual ~Optimizer() = default;
  virtual void step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                    int threads) = 0;
  virtual long long steps() const = 0;
};

// `prepare(ctx, threads)` sets up the context of each step (threads, or device and stream)
// and returns what must live while the step runs (a device guard).
template <class Set, class Config, class Prepare>
struct OptimizerT : Optimizer {
  using T = typename Set::Scalar;
  using D = typename Set::device;
  Config config;
  at::Device device;
  mxd::AdamW<T, D, Set> opt;
  mxd::Context<D> ctx;
  Prepare prepare;
  OptimizerT(const Config& c, const std::vector<at::Tensor>& params, const mxd::AdamWConfig& oc,
             Prepare prep)
      : config(c), device(params.at(0).device()),
        opt(borrow_set<Set>(c, params, "parameters", params.at(0).device()), oc),
        prepare(std::move(prep)) {}
  void step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
            int threads) override {
    Set p = borrow_set<Set>(config, params, "parameters", device);
    const Set g = borrow_set<Set>(config, grads, "gradients", device);
    [[maybe_unused]] auto scope = prepare(ctx, threads);
    opt.step(p, g, ctx);
    // Written through raw memory: tell autograd, as torch's in-place updates do.
    for (const at::Tensor& t : params) t.unsafeGetTensorImpl()->bump_version();
  }
  long long steps() const override { return opt.t; }
};

// ---- The CUDA half ----

// Defined in _ext_cuda.cu, compiled by nvcc, in builds with CUDA (MXD_TORCH_CUDA), for
// Config = mxd::Config and mxd::TranscoderConfig: the calls on tensors on a GPU, on torch's
// current stream, each with its forward cache in tensors (forward_saved, backward_saved).
// math: "fp32", "tf32" or "bf16" (mxd::MathMode, float32 layers only).
namespace gpu {
// Routes mxd's device memory to torch's caching allocator and its memsets to torch's current
// stream (mxd::CudaMemoryHooks); touches no GPU.
void install_memory_hooks();
template <class Config>
std::pair<at::Tensor, std::vector<at::Tensor>> forward(const Config& c,
                                                       const std::vector<at::Tensor>& params,
                                                       const at::Tensor& x,
                                                       const mxd::Steering* steering, index_t K,
                                                       const std::string& math);
template <class Config>
std::pair<at::Tensor, std::vector<at::Tensor>> backward(
    const Config& c, const std::vector<at::Tensor>& params, const at::Tensor& x, const at::Tensor& dy,
    const std::vector<at::Tensor>& saved, bool need_dx, const std::string& math,
    GradBuffers* buffers, const std::vector<bool>& reuse_ok);
template <class Config>
std::unique_ptr<Optimizer> adamw(const Config& c, const std::vector<at::Tensor>& params,
                                 const mxd::AdamWConfig& oc);
}  // namespace gpu

}  // namespace mxd_torch
