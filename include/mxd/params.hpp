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
    each_shaped(*this, [](const char*, Tensor<T, Device>& t, index_t rows, index_t cols) {
      t.resize(rows, cols);
    });
  }

  /// A parameter set over memory someone else owns, with no copy (Tensor::borrow):
  /// `memory(reference_name, rows, cols)` returns the T* of a contiguous row-major
  /// [rows, cols] block, in mxd's layouts (C as [N, O], biases [1, n]), that outlives the set.
  /// Forward, backward and AdamW then read and write that memory directly.
  template <class F>
  static Params borrow(const Config& cfg, F&& memory) {
    cfg.validate();
    Params p;
    p.config = cfg;
    each_shaped(p, [&](const char* name, Tensor<T, Device>& t, index_t rows, index_t cols) {
      t = Tensor<T, Device>::borrow(memory(name, rows, cols), rows, cols);
    });
    return p;
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
    each_shaped(p, [&](const char* name, auto& t, index_t, index_t) { f(name, t); });
  }

  // f(reference_name, tensor, rows, cols) for every parameter of p.config, in mxd's layout.
  template <class Self, class F>
  static void each_shaped(Self& p, F&& f) {
    const Config& c = p.config;
    const index_t I = c.d_in, H = c.d_hidden, O = c.d_out, N = c.n_experts;
    f("W_enc", p.E, I, H);
    f("b_enc", p.b_enc, 1, H);
    f("W_dec", p.D, H, O);
    f("gate", p.G, N, I);
    f("gate_bias", p.b_gate, 1, N);
    f("W_cond", p.C, N, O);
    f("b_dec_out", p.b_out, 1, O);
    if (c.glu) {
      f("W_glu.weight", p.W_glu, H, I);
      f("W_glu.bias", p.b_glu, 1, H);
    }
    if (c.skip) f("W_skip.weight", p.W_skip, O, I);
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
