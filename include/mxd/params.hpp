// SPDX-License-Identifier: MIT
/// @file params.hpp
/// @brief Params<T, Device>: the weights of one MxD layer (and, with the same type, its gradients).
///
/// Names and layouts follow the authors' state dict (row-major), except C, which is kept
/// expert-major [N, O] so one expert's vector c_n is a contiguous row; the files' `W_cond`
/// [O, N] = C^T is converted at the I/O boundary (io/params_io.hpp).
#pragma once

#include <string>

#include "config.hpp"
#include "tensor.hpp"

namespace mxd {

// I = d_in, H = d_hidden, O = d_out, N = n_experts.
template <class T, class Device = cpu>
struct Params {
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
  explicit Params(const Config& cfg) : config(cfg) {
    cfg.validate();
    const index_t I = cfg.d_in, H = cfg.d_hidden, O = cfg.d_out, N = cfg.n_experts;
    E.resize(I, H);
    b_enc.resize(1, H);
    D.resize(H, O);
    G.resize(N, I);
    b_gate.resize(1, N);
    C.resize(N, O);
    b_out.resize(1, O);
    if (cfg.glu) {
      W_glu.resize(H, I);
      b_glu.resize(1, H);
    }
    if (cfg.skip) W_skip.resize(O, I);
  }

  /// Calls f(reference_name, tensor) for every parameter this config has, in a fixed order.
  /// "W_cond" is handed over in the internal [N, O] layout.
  template <class F>
  void for_each(F&& f) {
    for_each_impl(*this, f);
  }
  template <class F>
  void for_each(F&& f) const {
    for_each_impl(*this, f);
  }

  /// True for the parameter stored transposed in files: W_cond is [O, N] there, C is [N, O].
  static bool transposed_in_file(const std::string& reference_name) {
    return reference_name == "W_cond";
  }

  /// Sets every parameter to zero (what a gradient buffer starts from).
  void set_zero() {
    for_each([](const char*, Tensor<T, Device>& t) { t.set_zero(); });
  }

private:
  template <class Self, class F>
  static void for_each_impl(Self& p, F& f) {
    f("W_enc", p.E);
    f("b_enc", p.b_enc);
    f("W_dec", p.D);
    f("gate", p.G);
    f("gate_bias", p.b_gate);
    f("W_cond", p.C);
    f("b_dec_out", p.b_out);
    if (p.config.glu) {
      f("W_glu.weight", p.W_glu);
      f("W_glu.bias", p.b_glu);
    }
    if (p.config.skip) f("W_skip.weight", p.W_skip);
  }
};

/// True for the parameters stored 1-D in files ([n]) and as [1, n] in memory.
inline bool is_bias(const std::string& reference_name) {
  return reference_name == "b_enc" || reference_name == "gate_bias" ||
         reference_name == "b_dec_out" || reference_name == "W_glu.bias";
}

/// Gradients have exactly the parameters' shapes.
template <class T, class Device = cpu>
using Grads = Params<T, Device>;

}  // namespace mxd
