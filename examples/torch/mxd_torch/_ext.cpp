// SPDX-License-Identifier: MIT
// mxd_torch's C++ side: the Python bindings, and the adapter (adapter.h) over the CPU backend.
// Each call goes to the parameters' device: the CPU here, a GPU through _ext_cuda.cu (builds
// with CUDA, MXD_TORCH_CUDA). The calls are written once for every model; the bindings take
// either config (mxd.Config, mxd.TranscoderConfig) and pybind picks the instantiation.
// mxd::Error becomes the Python exception mxd_torch.Error.
#include <ATen/ATen.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <mxd/mxd.hpp>

#include <mxd/init.hpp>
#include <mxd/io/checkpoint.hpp>
#include <mxd/io/params_io.hpp>

#include "adapter.h"

namespace py = pybind11;
using mxd::index_t;
using namespace mxd_torch;

namespace {

#ifdef MXD_TORCH_CUDA
constexpr bool built_with_cuda = true;
#else
constexpr bool built_with_cuda = false;
#endif

// Throws unless mxd_torch computes on t's device.
void check_supported(const at::Tensor& t, const char* name) {
  MXD_CHECK(t.defined(), name, " is missing (None)");
  if (t.device().is_cpu()) return;
  if (t.device().is_cuda()) {
    MXD_CHECK(built_with_cuda, name, " is on ", t.device().str(), ": this mxd_torch was built "
              "without CUDA (build it against a CUDA build of torch with nvcc installed, see "
              "examples/torch/README.md)");
    return;
  }
  MXD_CHECK(false, name, " is on ", t.device().str(), ": mxd_torch computes on the CPU",
            built_with_cuda ? " and on CUDA GPUs" : "");
}

// The device of one call: the parameters' (W_enc's), once mxd_torch computes on x's and
// theirs; every tensor is then checked against it.
at::Device call_device(const std::vector<at::Tensor>& params, const at::Tensor& x) {
  check_supported(x, "x");
  check_supported(first(params), "W_enc");
  return first(params).device();
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

// The forward cache of one eager layer call, kept by autograd until backward. On the CPU it
// is the workspace of the model and dtype, reused from call to call (its memory stays mapped);
// on a GPU the cache tensors, as the custom ops keep them.
struct Cache {
  mxd::Workspace<float> mxd_f;
  mxd::Workspace<double> mxd_d;
  mxd::TranscoderWorkspace<float> tc_f;
  mxd::TranscoderWorkspace<double> tc_d;
  std::vector<at::Tensor> saved;  // GPU calls
  std::string math;               // GPU calls: the forward's, for the backward
  bool transcoder = false;
  at::ScalarType dtype = at::kFloat;
  at::Device device = at::kCPU;
  std::vector<std::int64_t> lead;  // x's leading dimensions
  bool filled = false;

  template <class Config, class T>
  auto& ws() {
    if constexpr (std::is_same_v<Config, mxd::Config>) {
      if constexpr (std::is_same_v<T, float>) return mxd_f;
      else return mxd_d;
    } else {
      if constexpr (std::is_same_v<T, float>) return tc_f;
      else return tc_d;
    }
  }

  template <class Config>
  void start(const at::Tensor& x, const at::Device& d) {
    transcoder = std::is_same_v<Config, mxd::TranscoderConfig>;
    dtype = x.scalar_type();
    device = d;
    lead = x.sizes().vec();
    lead.pop_back();
    saved.clear();
    filled = false;
  }

  template <class Config>
  void check(const at::Tensor& x, const at::Device& d) const {
    const bool tc = std::is_same_v<Config, mxd::TranscoderConfig>;
    MXD_CHECK(filled && transcoder == tc && dtype == x.scalar_type() && device == d,
              "backward: the cache holds no ", tc ? "transcoder" : "MxD", " forward of dtype ",
              c10::toString(x.scalar_type()), " on ", d.str());
  }

  // The last forward's selection: (indices int64, values) as [..., k (+ steering edits)].
  template <class Config, class T>
  std::pair<at::Tensor, at::Tensor> topk_cpu() {
    auto& w = ws<Config, T>();
    const mxd::Tensor<std::int32_t>& idx = w.topk_idx;
    const mxd::View<const T> val = Model<Config>::coefficients(w);
    std::vector<std::int64_t> shape = lead;
    shape.push_back(idx.cols());
    at::Tensor i = at::empty(shape, at::kLong), v = at::empty(shape, scalar_of<T>());
    std::int64_t* ip = i.data_ptr<std::int64_t>();
    T* vp = v.data_ptr<T>();
    for (index_t n = 0; n < idx.size(); ++n) {
      ip[n] = idx[n];
      vp[n] = val.data[n];
    }
    return {i, v};
  }
  template <class Config>
  std::pair<at::Tensor, at::Tensor> topk_saved() const {
    using M = Model<Config>;
    const at::Tensor& coef = saved.at(M::coef_at);
    const at::Tensor& val = coef.numel() > 0 ? coef : saved.at(M::val_at);
    std::vector<std::int64_t> shape = lead;
    shape.push_back(val.size(1));
    return {saved.at(M::idx_at).to(at::kLong).reshape(shape), val.reshape(shape)};
  }
  template <class Config>
  std::pair<at::Tensor, at::Tensor> topk_of() {
    if (!saved.empty()) return topk_saved<Config>();
    if (dtype == at::kFloat) return topk_cpu<Config, float>();
    return topk_cpu<Config, double>();
  }
  std::pair<at::Tensor, at::Tensor> topk() {
    MXD_CHECK(filled, "no forward has run on this cache yet");
    return transcoder ? topk_of<mxd::TranscoderConfig>() : topk_of<mxd::Config>();
  }
};

// The custom ops' CPU calls bind a workspace of the calling thread (its scratch reused from
// call to call) to their cache tensors.
template <class W>
W& scratch() {
  thread_local W ws;
  return ws;
}

// ---- Forward and backward: eager (a Cache) and as ops (cache tensors), any model ----

template <class Config>
at::Tensor forward(const Config& c, const std::vector<at::Tensor>& params, const at::Tensor& x,
                   Cache& cache, const Edits& edits, int threads, const std::string& math) {
  const at::Device device = call_device(params, x);
  const index_t K = c.k + edits.count();
  cache.start<Config>(x, device);
  // In a template, the discarded branch of `if constexpr` is never instantiated: builds
  // without CUDA reference no gpu:: function.
  if constexpr (built_with_cuda) {
    if (device.is_cuda()) {
      auto [y, saved] = gpu::forward(c, params, x, edits.get(), K, math);
      cache.saved = std::move(saved);
      cache.math = math;
      cache.filled = true;
      return y;
    }
  }
  at::Tensor y = by_dtype(first(params), "W_enc", [&](auto zero) {
    using T = decltype(zero);
    auto& ws = cache.ws<Config, T>();
    ws.ctx.threads = threads;
    return forward_into<Config, T, mxd::cpu>(c, params, x, ws, edits.get(), K);
  });
  cache.filled = true;
  return y;
}

template <class Config>
std::pair<at::Tensor, std::vector<at::Tensor>> backward(
    const Config& c, const std::vector<at::Tensor>& params, const at::Tensor& x, const at::Tensor& dy,
    Cache& cache, bool need_dx, GradBuffers& buffers, const std::vector<bool>& reuse_ok, int threads) {
  const at::Device device = call_device(params, x);
  cache.check<Config>(x, device);
  if constexpr (built_with_cuda) {
    if (device.is_cuda())
      return gpu::backward(c, params, x, dy, cache.saved, need_dx, cache.math, &buffers, reuse_ok);
  }
  return by_dtype(first(params), "W_enc", [&](auto zero) {
    using T = decltype(zero);
    auto& ws = cache.ws<Config, T>();
    ws.ctx.threads = threads;
    return backward_from<Config, T, mxd::cpu>(c, params, x, dy, ws, need_dx, &buffers, reuse_ok);
  });
}

// The forward op: (y, [the cache tensors]).
template <class Config>
std::pair<at::Tensor, std::vector<at::Tensor>> forward_op(const Config& c,
                                                          const std::vector<at::Tensor>& params,
                                                          const at::Tensor& x, const Edits& edits,
                                                          int threads, const std::string& math) {
  const at::Device device = call_device(params, x);
  const index_t K = c.k + edits.count();
  if constexpr (built_with_cuda) {
    if (device.is_cuda()) return gpu::forward(c, params, x, edits.get(), K, math);
  }
  return by_dtype(first(params), "W_enc", [&](auto zero) {
    using T = decltype(zero);
    auto& ws = scratch<typename Model<Config>::template Workspace<T, mxd::cpu>>();
    ws.ctx.threads = threads;
    return forward_saved<Config, T, mxd::cpu>(c, params, x, ws, edits.get(), K);
  });
}

// The backward op, over the forward op's cache tensors: (dx or None, [dL/dparam]), all fresh.
template <class Config>
std::pair<at::Tensor, std::vector<at::Tensor>> backward_op(
    const Config& c, const std::vector<at::Tensor>& params, const at::Tensor& x, const at::Tensor& dy,
    const std::vector<at::Tensor>& saved, bool need_dx, int threads, const std::string& math) {
  const at::Device device = call_device(params, x);
  if constexpr (built_with_cuda) {
    if (device.is_cuda()) return gpu::backward(c, params, x, dy, saved, need_dx, math, nullptr, {});
  }
  return by_dtype(first(params), "W_enc", [&](auto zero) {
    using T = decltype(zero);
    auto& ws = scratch<typename Model<Config>::template Workspace<T, mxd::cpu>>();
    ws.ctx.threads = threads;
    return backward_saved<Config, T, mxd::cpu>(c, params, x, dy, saved, ws, need_dx, nullptr, {});
  });
}

// ---- Initialisation and files (on the CPU; the Python side moves parameters) ----

const at::Device host(at::kCPU);

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

template <class T>
void init_set(mxd::Params<T>& p, std::uint64_t seed) {
  mxd::init_params(p, seed);
}
template <class T>
void init_set(mxd::TranscoderParams<T>& p, std::uint64_t seed) {
  mxd::init_transcoder(p, seed);
}

// The authors' initialisation (mxd::init_params, init_transcoder), written into fresh torch
// tensors; without a seed the tensors are left unwritten (their layouts, for the meta device).
template <class Config>
std::vector<at::Tensor> init(const Config& c, std::optional<std::uint64_t> seed,
                             const std::string& dtype) {
  return by_scalar(dtype_arg(dtype), [&](auto zero) {
    using T = decltype(zero);
    using Set = typename Model<Config>::template Params<T, mxd::cpu>;
    auto [p, tensors] = allocate_set<Set>(c, at::TensorOptions(scalar_of<T>()));
    if (seed) init_set(p, *seed);
    return tensors;
  });
}

// Reads a saved parameter set with mxd's reader straight into fresh torch tensors.
template <class Config>
std::vector<at::Tensor> read_set(mxd::io::SafetensorsReader& f, const Config& c, at::ScalarType dtype) {
  return by_scalar(dtype, [&](auto zero) {
    using T = decltype(zero);
    using Set = typename Model<Config>::template Params<T, mxd::cpu>;
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
  std::vector<at::Tensor> tensors = read_set(f, c, t);
  py::gil_scoped_acquire gil;
  return py::make_tuple(c, tensors);
}

py::tuple transcoder_load(const std::string& path, const std::string& dtype) {
  const at::ScalarType t = dtype_arg(dtype);
  py::gil_scoped_release nogil;
  mxd::io::SafetensorsReader f(path);
  mxd::TranscoderConfig c = mxd::io::read_transcoder_config(f);
  std::vector<at::Tensor> tensors = read_set(f, c, t);
  if (c.rank_by_decoder_norm) {
    // The op selects by relu(pre) alone: a model trained ranking by decoder norm (SAELens's
    // rule, mxd train's default baseline) loads with the norms folded into its encoder, the
    // same selection and output.
    by_dtype(first(tensors), "W_enc", [&](auto zero) {
      using T = decltype(zero);
      using M = Model<mxd::TranscoderConfig>;
      auto p = borrow_set<typename M::template Params<T, mxd::cpu>>(c, tensors, M::params_name, host);
      mxd::fold_decoder_norm(p);
      return 0;
    });
    c.rank_by_decoder_norm = false;
  }
  py::gil_scoped_acquire gil;
  return py::make_tuple(c, tensors);
}

// Writes the parameters (in their dtype, from host memory) with their config, atomically, as
// `mxd train` does.
template <class Config>
void save(const std::string& path, const Config& c, const std::vector<at::Tensor>& params) {
  by_dtype(first(params), "W_enc", [&](auto zero) {
    using T = decltype(zero);
    using M = Model<Config>;
    const auto p = borrow_set<typename M::template Params<T, mxd::cpu>>(c, params, M::params_name, host);
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

template <class Config>
std::unique_ptr<Optimizer> make_optimizer(const Config& c, const std::vector<at::Tensor>& params,
                                          const mxd::AdamWConfig& oc) {
  const at::Device device = call_device(params, first(params));
  if constexpr (built_with_cuda) {
    if (device.is_cuda()) return gpu::adamw(c, params, oc);
  }
  return by_dtype(first(params), "W_enc", [&](auto zero) -> std::unique_ptr<Optimizer> {
    using T = decltype(zero);
    using Set = typename Model<Config>::template Params<T, mxd::cpu>;
    auto prepare = [](mxd::Context<mxd::cpu>& ctx, int threads) {
      ctx.threads = threads;
      return 0;
    };
    return std::make_unique<OptimizerT<Set, Config, decltype(prepare)>>(c, params, oc, prepare);
  });
}

// Binds the calls written over the config type for both configs (pybind picks by the type of
// the config argument).
template <class Config>
void bind_model(py::module_& m) {
  using nogil = py::call_guard<py::gil_scoped_release>;
  m.def("forward", &forward<Config>, py::arg("config"), py::arg("params"), py::arg("x"),
        py::arg("cache"), py::arg("edits"), py::arg("threads"), py::arg("math"), nogil());
  m.def("backward", &backward<Config>, py::arg("config"), py::arg("params"), py::arg("x"),
        py::arg("dy"), py::arg("cache"), py::arg("need_dx"), py::arg("buffers"),
        py::arg("reuse_ok"), py::arg("threads"), nogil());
  m.def("forward_op", &forward_op<Config>, py::arg("config"), py::arg("params"), py::arg("x"),
        py::arg("edits"), py::arg("threads"), py::arg("math"), nogil());
  m.def("backward_op", &backward_op<Config>, py::arg("config"), py::arg("params"), py::arg("x"),
        py::arg("dy"), py::arg("saved"), py::arg("need_dx"), py::arg("threads"), py::arg("math"),
        nogil());
  m.def("init", &init<Config>, py::arg("config"), py::arg("seed"), py::arg("dtype"));
  m.def("save", &save<Config>, py::arg("path"), py::arg("config"), py::arg("params"), nogil());
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
#ifdef MXD_TORCH_CUDA
  gpu::install_memory_hooks();
#endif
  m.attr("has_cuda") = built_with_cuda;

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
        std::vector<std::string> names;
        mxd::TranscoderParams<float> empty;
        empty.config = c;
        empty.for_each([&](const char* name, const mxd::Tensor<float>&) { names.push_back(name); });
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
               return make_optimizer(config.cast<mxd::Config>(), params, oc);
             return make_optimizer(config.cast<mxd::TranscoderConfig>(), params, oc);
           }),
           py::arg("config"), py::arg("params"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"),
           py::arg("eps"), py::arg("weight_decay"), py::arg("warmup_steps"))
      .def("step", &Optimizer::step, py::arg("params"), py::arg("grads"), py::arg("threads"),
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("steps", &Optimizer::steps);

  bind_model<mxd::Config>(m);
  bind_model<mxd::TranscoderConfig>(m);
  m.def("mxd_load", &mxd_load, py::arg("path"), py::arg("dtype"));
  m.def("transcoder_load", &transcoder_load, py::arg("path"), py::arg("dtype"));
  m.def("read_safetensors", &read_safetensors, py::arg("path"));
  m.def("matched_experts", [](index_t d_in, index_t d_hidden, index_t d_out, index_t m, bool glu,
                              bool skip) { return mxd::matched_experts(d_in, d_hidden, d_out, m, glu, skip); },
        py::arg("d_in"), py::arg("d_hidden"), py::arg("d_out"), py::arg("m"), py::arg("glu") = false,
        py::arg("skip") = false);
}
