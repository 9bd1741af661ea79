// SPDX-License-Identifier: MIT
/// @file io/params_io.hpp
/// @brief MxD parameters and configs in safetensors files, under the authors' names and layouts.
///
///     mxd::io::SafetensorsReader f("layer.safetensors");
///     mxd::Config cfg = mxd::io::read_config(f);          // sizes from shapes, options from metadata
///     mxd::Params<float> p = mxd::io::load_params<float>(f, cfg);
///     mxd::io::save_params("copy.safetensors", p);        // written atomically
///
/// Keys: W_enc [I,H], b_enc [H], W_dec [H,O], gate [N,I], gate_bias [N], W_cond [O,N],
/// b_dec_out [O], W_glu.weight [H,I], W_glu.bias [H], W_skip.weight [O,I]. The authors' unused
/// b_dec is accepted and ignored. Metadata: activation, k, glu, skip (strings).
#pragma once

#include <algorithm>
#include <cctype>
#include <string>
#include <type_traits>
#include <vector>

#include "../config.hpp"
#include "../finite.hpp"
#include "../params.hpp"
#include "safetensors.hpp"

namespace mxd::io {

/// Parses a non-negative decimal integer stored under metadata `key`; names both on failure.
inline index_t parse_index(const std::string& key, const std::string& value) {
  MXD_CHECK(!value.empty() && value.size() <= 18, "metadata '", mxd::detail::printable(key),
            "' = '", mxd::detail::printable(value), "' is not a non-negative integer");
  index_t v = 0;
  for (char ch : value) {
    MXD_CHECK(std::isdigit(static_cast<unsigned char>(ch)), "metadata '",
              mxd::detail::printable(key), "' = '", mxd::detail::printable(value),
              "' is not a non-negative integer");
    v = v * 10 + (ch - '0');
  }
  return v;
}

/// Parses a 0/1 flag ("true"/"false" accepted too) stored under metadata `key`.
inline bool parse_flag(const std::string& key, const std::string& value) {
  if (value == "1" || value == "true" || value == "True") return true;
  if (value == "0" || value == "false" || value == "False") return false;
  throw Error("metadata '" + mxd::detail::printable(key) + "' = '" +
              mxd::detail::printable(value) + "' is not a flag (0 or 1)");
}

namespace detail {

inline std::vector<std::int64_t> shape_of(const SafetensorsReader& f, const std::string& name,
                                          std::size_t rank) {
  const TensorInfo& t = f.info(name);
  MXD_CHECK(t.shape.size() == rank, "tensor '", name, "' in ", f.path(), " has rank ",
            t.shape.size(), ", expected ", rank);
  return t.shape;
}

// Throws unless tensor `name` has exactly `shape`: every size read from one tensor is checked
// against all the others before anything is allocated (a zero or huge dimension in one tensor
// cannot size the buffers of the rest).
inline void expect_shape(const SafetensorsReader& f, const std::string& name,
                         const std::vector<std::int64_t>& shape) {
  const TensorInfo& t = f.info(name);
  MXD_CHECK(t.shape == shape, "tensor '", name, "' in ", f.path(), " has shape ",
            shape_str(t.shape), ", expected ", shape_str(shape));
}

// Throws "tensor 'key' in PATH: non-finite value at row r (column c)" unless every value is
// finite (the NaN/Inf policy: nothing non-finite is loaded). v holds `shape` row-major.
template <class T>
void check_loaded(const SafetensorsReader& f, const std::string& key, const std::vector<T>& v,
                  const std::vector<std::int64_t>& shape) {
  if constexpr (std::is_floating_point_v<T>) {
    const index_t cols = shape.empty() ? 1 : shape.back();
    const index_t rows = cols ? static_cast<index_t>(v.size()) / cols : 0;
    check_finite<T>(View<const T, cpu>(v.data(), rows, cols),
                    "tensor '" + key + "' in " + f.path());
  }
}

}  // namespace detail

/// A parameter's values and shape in its file layout (ParamDesc: transposed ones as
/// [cols, rows], biases 1-D); the shape is t's.
template <class T>
std::vector<T> file_layout(const ParamDesc& d, const Tensor<T>& t,
                           std::vector<std::int64_t>& shape) {
  if (d.transposed) {
    shape = {t.cols(), t.rows()};
    std::vector<T> out(static_cast<std::size_t>(t.size()));
    for (index_t r = 0; r < t.rows(); ++r)
      for (index_t c = 0; c < t.cols(); ++c) out[c * t.rows() + r] = t(r, c);
    return out;
  }
  shape = d.bias ? std::vector<std::int64_t>{t.cols()}
                 : std::vector<std::int64_t>{t.rows(), t.cols()};
  return std::vector<T>(t.data(), t.data() + t.size());
}

/// The same for parameter `name` of a set `Set` (Params, TranscoderParams), for callers that
/// hold only a name.
template <class Set, class T>
std::vector<T> file_layout(const std::string& name, const Tensor<T>& t,
                           std::vector<std::int64_t>& shape) {
  return file_layout(Set::find(name), t, shape);
}

/// Reads tensor `key`, stored in the file layout of parameter d, into `t` (already shaped);
/// a shape mismatch is an error naming the key.
template <class T>
void read_file_layout(SafetensorsReader& f, const std::string& key, const ParamDesc& d,
                      Tensor<T>& t) {
  std::vector<std::int64_t> shape;
  file_layout(d, t, shape);
  const std::vector<T> v = f.read_all<T>(key, shape);
  detail::check_loaded(f, key, v, shape);
  if (d.transposed) {
    for (index_t r = 0; r < t.rows(); ++r)
      for (index_t c = 0; c < t.cols(); ++c) t(r, c) = v[c * t.rows() + r];
  } else {
    std::copy(v.begin(), v.end(), t.data());
  }
}

/// The same for parameter `name` of a set `Set`, for callers that hold only a name.
template <class Set, class T>
void read_file_layout(SafetensorsReader& f, const std::string& key, const std::string& name,
                      Tensor<T>& t) {
  read_file_layout(f, key, Set::find(name), t);
}

/// Throws unless the file holds every parameter of a set `Set` of config c in its file shape,
/// each checked against the config (so against the others) before anything is allocated.
template <class Set, class Cfg>
void expect_param_shapes(const SafetensorsReader& f, const Cfg& c) {
  Set::describe(c, [&](const ParamDesc& d) { detail::expect_shape(f, d.name, d.file_shape()); });
}

/// Reads every parameter of a set `Set` (Params, TranscoderParams) of config c under its
/// reference name, converting to the set's T and layouts.
template <class Set, class Cfg>
Set load_param_set(SafetensorsReader& f, const Cfg& c) {
  Set p(c);
  p.for_each_param([&](const ParamDesc& d, auto& t) { read_file_layout(f, d.name, d, t); });
  return p;
}

/// An MxD parameter's values and shape in the reference layout (W_cond [O, N], biases 1-D).
template <class T>
std::vector<T> reference_layout(const std::string& name, const Tensor<T>& t,
                                std::vector<std::int64_t>& shape) {
  return file_layout<Params<T>>(name, t, shape);
}

/// The layer's config: d_in, d_hidden, d_out, n_experts from the shapes of W_enc, W_dec and
/// gate; activation and k from `__metadata__`; glu and skip from metadata when present, else
/// from whether W_glu.weight / W_skip.weight exist. Validated before it is returned.
inline Config read_config(const SafetensorsReader& f) {
  const auto& meta = f.metadata();
  auto model = meta.find("model");
  MXD_CHECK(model == meta.end() || model->second == "mxd", f.path(), " holds a '",
            mxd::detail::printable(model->second), "' model, not an MxD");
  Config c;
  const auto enc = detail::shape_of(f, "W_enc", 2), gate = detail::shape_of(f, "gate", 2);
  const auto dec = detail::shape_of(f, "W_dec", 2);
  c.d_in = enc[0];
  c.d_hidden = enc[1];
  c.d_out = dec[1];
  c.n_experts = gate[0];
  MXD_CHECK(std::min({enc[0], enc[1], dec[0], dec[1], gate[0], gate[1]}) > 0, f.path(),
            ": W_enc ", detail::shape_str(enc), ", W_dec ", detail::shape_str(dec), " and gate ",
            detail::shape_str(gate), " must have no zero dimension");
  auto required = [&](const char* key) -> const std::string& {
    auto it = meta.find(key);
    MXD_CHECK(it != meta.end(), f.path(), ": __metadata__ has no '", key, "'");
    return it->second;
  };
  c.activation = parse_activation(required("activation"));
  c.k = parse_index("k", required("k"));
  auto flag = [&](const char* key, const char* tensor) {
    auto it = meta.find(key);
    const bool present = f.contains(tensor);
    if (it == meta.end()) return present;
    const bool on = parse_flag(key, it->second);
    MXD_CHECK(on == present, f.path(), ": metadata '", key, "' = ", it->second,
              " but tensor '",
              tensor, "' is ", present ? "present" : "missing");
    return on;
  };
  c.glu = flag("glu", "W_glu.weight");
  c.skip = flag("skip", "W_skip.weight");
  c.validate();
  expect_param_shapes<Params<float>>(f, c);
  return c;
}

/// Reads tensor `name` of shape exactly [rows, cols] (or [cols] when rows < 0) into `out`.
template <class T>
void read_tensor(SafetensorsReader& f, const std::string& name, index_t rows, index_t cols,
                 Tensor<T>& out) {
  const std::vector<std::int64_t> shape =
      rows < 0 ? std::vector<std::int64_t>{cols} : std::vector<std::int64_t>{rows, cols};
  std::vector<T> data = f.template read_all<T>(name, shape);
  detail::check_loaded(f, name, data, shape);
  out.resize(rows < 0 ? 1 : rows, cols, false);
  std::copy(data.begin(), data.end(), out.data());
}

/// Reads a 2-D tensor [rows, d] whose rows are free and whose width must be `cols`
/// (any width when cols < 0), e.g. a batch of inputs.
template <class T>
Tensor<T> read_matrix(SafetensorsReader& f, const std::string& name, index_t cols = -1) {
  const auto shape = detail::shape_of(f, name, 2);
  MXD_CHECK(cols < 0 || shape[1] == cols, "tensor '", name, "' in ", f.path(), " has shape [",
            shape[0], ", ", shape[1], "], expected [*, ", cols, "]");
  Tensor<T> t;
  read_tensor(f, name, shape[0], shape[1], t);
  return t;
}

/// Loads every parameter of `cfg` under the reference names, converting to T and C to [N, O].
template <class T>
Params<T> load_params(SafetensorsReader& f, const Config& cfg) {
  return load_param_set<Params<T>>(f, cfg);
}

/// Writes the config's options as metadata strings (sizes are implied by the shapes).
inline void add_config_metadata(SafetensorsWriter& w, const Config& c) {
  w.set_metadata("activation", activation_name(c.activation));
  w.set_metadata("k", std::to_string(c.k));
  w.set_metadata("glu", c.glu ? "1" : "0");
  w.set_metadata("skip", c.skip ? "1" : "0");
  w.set_metadata("d_in", std::to_string(c.d_in));
  w.set_metadata("d_hidden", std::to_string(c.d_hidden));
  w.set_metadata("d_out", std::to_string(c.d_out));
  w.set_metadata("n_experts", std::to_string(c.n_experts));
}

/// Adds every tensor of a parameter set under `prefix` + reference name, in the file layouts,
/// stored as `dtype` (default: T's own, so nothing is rounded).
template <template <class, class> class Set, class T>
void add_params(SafetensorsWriter& w, const Set<T, cpu>& p, DType dtype = dtype_of<T>(),
                const std::string& prefix = "") {
  p.for_each_param([&](const ParamDesc& d, const Tensor<T>& t) {
    std::vector<std::int64_t> shape;
    const std::vector<T> values = file_layout(d, t, shape);
    w.add(prefix + d.name, shape, values.data(), dtype);
  });
}

/// Saves parameters and config metadata to `path` (temporary file, then rename).
template <class T>
void save_params(const std::string& path, const Params<T>& p, DType dtype = dtype_of<T>()) {
  SafetensorsWriter w;
  add_config_metadata(w, p.config);
  add_params(w, p, dtype);
  w.write(path);
}

}  // namespace mxd::io
