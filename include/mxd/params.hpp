// SPDX-License-Identifier: MIT
/// @file params.hpp
/// @brief Params<T, Device>: the weights of one MxD layer (and, with the same type, its
/// gradients); ParamDesc, what each parameter of a set is, and ParamSet, what every
/// parameter set (Params, the transcoder's TranscoderParams) derives from it.
///
/// Names and layouts follow the authors' state dict (row-major), except C, which is kept
/// expert-major [N, O] so one expert's vector c_n is a contiguous row; the files' `W_cond`
/// [O, N] = C^T is converted at the I/O boundary (io/params_io.hpp).
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "config.hpp"
#include "tensor.hpp"

namespace mxd {

/// One parameter of a set: its name in the authors' state dict (the key in files), its shape
/// in mxd's layout, and how it is shared and stored. A set lists its parameters once, in
/// layout(); file I/O, checkpoints, expert-parallel sharding and data-parallel reduction read
/// these instead of comparing names (ParamSet::find answers callers that hold only a name).
struct ParamDesc {
  /// The constructor's flags, combined with |.
  enum Flag : unsigned {
    dense = 0,            // one copy, whatever the experts
    units = 1,            // a row per expert (MxD) or latent (transcoder); a column for a bias
    vector = 2,           // a bias: [1, n] in memory, 1-D [n] in files
    file_transposed = 4,  // [cols, rows] in files
  };

  const char* name = "";
  index_t rows = 0, cols = 0;
  bool per_unit = false;    // units: what expert parallelism shards (and AuxK revives)
  bool bias = false;        // vector
  bool transposed = false;  // file_transposed

  ParamDesc() = default;
  ParamDesc(const char* name_, index_t rows_, index_t cols_, unsigned flags = dense)
      : name(name_), rows(rows_), cols(cols_), per_unit((flags & units) != 0),
        bias((flags & vector) != 0), transposed((flags & file_transposed) != 0) {}

  /// Its shape in files: [cols, rows] when transposed, [cols] for a bias, else [rows, cols].
  std::vector<std::int64_t> file_shape() const {
    if (transposed) return {cols, rows};
    if (bias) return {cols};
    return {rows, cols};
  }
  /// Values per unit, for a per-unit parameter: a row (cols values), or 1 for a bias.
  index_t unit_size() const { return bias ? 1 : cols; }
};

/// What every parameter set shares, written once over the set's one list of its parameters:
/// `static void layout(const Cfg&, F f)` in Set calls f(ParamDesc, &Set::member) for every
/// parameter the config has, in a fixed order, and `static Cfg every_param()` gives a config
/// that has all of them (for the by-name queries).
template <class Set, class Cfg>
struct ParamSet {
  /// f(reference_name, tensor) for every parameter of the config, in layout order.
  template <class F>
  void for_each(F&& f) {
    each(self(), [&](const ParamDesc& d, auto& t) { f(d.name, t); });
  }
  template <class F>
  void for_each(F&& f) const {
    each(self(), [&](const ParamDesc& d, auto& t) { f(d.name, t); });
  }

  /// f(desc, tensor) for every parameter of the config, in layout order.
  template <class F>
  void for_each_param(F&& f) {
    each(self(), f);
  }
  template <class F>
  void for_each_param(F&& f) const {
    each(self(), f);
  }

  /// f(desc) for every parameter a set of config `c` has, in layout order.
  template <class F>
  static void describe(const Cfg& c, F&& f) {
    Set::layout(c, [&](const ParamDesc& d, auto) { f(d); });
  }

  /// The descriptor of the parameter named `reference_name` (shape left 0); a default one
  /// (named "", dense) when the set has none of that name.
  static ParamDesc find(const std::string& reference_name) {
    ParamDesc found;
    describe(Set::every_param(), [&](const ParamDesc& d) {
      if (reference_name == d.name) found = d;
    });
    found.rows = found.cols = 0;
    return found;
  }
  /// True for the parameter stored transposed in files (for callers that hold only a name).
  static bool transposed_in_file(const std::string& reference_name) {
    return find(reference_name).transposed;
  }

  /// Sets every parameter to zero (what a gradient buffer starts from).
  void set_zero() {
    for_each([](const char*, auto& t) { t.set_zero(); });
  }

  /// A set over memory someone else owns, with no copy (Tensor::borrow): `memory(reference_name,
  /// rows, cols)` returns the T* of a contiguous row-major [rows, cols] block in mxd's layouts
  /// (the descriptors' shapes), that outlives the set. Forward, backward and AdamW then read
  /// and write that memory directly.
  template <class F>
  static Set borrow(const Cfg& c, F&& memory) {
    c.validate();
    Set p;
    p.config = c;
    Set::layout(c, [&](const ParamDesc& d, auto member) {
      auto& t = p.*member;
      t = std::decay_t<decltype(t)>::borrow(memory(d.name, d.rows, d.cols), d.rows, d.cols);
    });
    return p;
  }

protected:
  /// Validates config and allocates every parameter of it, zero-filled (the constructors').
  void allocate() {
    self().config.validate();
    each(self(), [](const ParamDesc& d, auto& t) { t.resize(d.rows, d.cols); });
  }

private:
  Set& self() { return static_cast<Set&>(*this); }
  const Set& self() const { return static_cast<const Set&>(*this); }

  template <class Self, class F>
  static void each(Self& p, F&& f) {
    Set::layout(p.config, [&](const ParamDesc& d, auto member) { f(d, p.*member); });
  }
};

// I = d_in, H = d_hidden, O = d_out, N = n_experts.
template <class T, class Device = cpu>
struct Params : ParamSet<Params<T, Device>, Config> {
  using Scalar = T;
  using device = Device;
  Config config;
  Tensor<T, Device> E;       // [I, H]  encoder              (W_enc)
  Tensor<T, Device> b_enc;   // [1, H]                        (b_enc)
  Tensor<T, Device> D;       // [H, O]  shared decoder        (W_dec)
  Tensor<T, Device> G;       // [N, I]  gating matrix         (gate)
  Tensor<T, Device> b_gate;  // [1, N]                        (gate_bias)
  Tensor<T, Device> C;       // [N, O]  expert vectors c_n    (W_cond^T)
  Tensor<T, Device> b_out;   // [1, O]                        (b_dec_out)
  Tensor<T, Device> W_glu;   // [H, I]  GLU branch, glu only  (W_glu.weight)
  Tensor<T, Device> b_glu;   // [1, H]                        (W_glu.bias)
  Tensor<T, Device> W_skip;  // [O, I]  skip, skip only       (W_skip.weight)

  Params() = default;
  /// Validates `cfg` and allocates every parameter of it, zero-filled.
  explicit Params(const Config& cfg) : config(cfg) { this->allocate(); }

  /// The parameters of config c, in for_each order, with their members: the one list.
  /// "W_cond" is C, held [N, O] here and [O, N] in files.
  template <class F>
  static void layout(const Config& c, F&& f) {
    using P = ParamDesc;
    const index_t I = c.d_in, H = c.d_hidden, O = c.d_out, N = c.n_experts;
    f(P("W_enc", I, H), &Params::E);
    f(P("b_enc", 1, H, P::vector), &Params::b_enc);
    f(P("W_dec", H, O), &Params::D);
    f(P("gate", N, I, P::units), &Params::G);
    f(P("gate_bias", 1, N, P::units | P::vector), &Params::b_gate);
    f(P("W_cond", N, O, P::units | P::file_transposed), &Params::C);
    f(P("b_dec_out", 1, O, P::vector), &Params::b_out);
    if (c.glu) {
      f(P("W_glu.weight", H, I), &Params::W_glu);
      f(P("W_glu.bias", 1, H, P::vector), &Params::b_glu);
    }
    if (c.skip) f(P("W_skip.weight", O, I), &Params::W_skip);
  }
  /// A config with every optional parameter (GLU and skip).
  static Config every_param() {
    Config c;
    c.glu = c.skip = true;
    return c;
  }
};

/// True for the parameters stored 1-D in files ([n]) and as [1, n] in memory (for callers
/// that hold only a name; the MxD's names cover the transcoder's biases too).
inline bool is_bias(const std::string& reference_name) {
  return Params<float>::find(reference_name).bias;
}

/// Gradients have exactly the parameters' shapes.
template <class T, class Device = cpu>
using Grads = Params<T, Device>;

}  // namespace mxd
