// SPDX-License-Identifier: MIT
/// @file config.hpp
/// @brief mxd::Config: the sizes and options of one MxD layer, and the activations it offers.
///
///     mxd::Config cfg;            // d_in, d_hidden, d_out, n_experts, k, activation, glu, skip
///     cfg.d_in = 768; cfg.d_hidden = 3072; cfg.d_out = 768; cfg.n_experts = 21504; cfg.k = 32;
///     cfg.validate();             // throws mxd::Error naming the first bad field
#pragma once

#include <cstdint>
#include <string>

#include "error.hpp"

namespace mxd {

using index_t = std::int64_t;

/// Activation of the encoder's hidden layer.
enum class Activation { relu, gelu, gelu_tanh, sigmoid, silu };

inline const char* activation_name(Activation a) {
  switch (a) {
    case Activation::relu: return "relu";
    case Activation::gelu: return "gelu";
    case Activation::gelu_tanh: return "gelu_tanh";
    case Activation::sigmoid: return "sigmoid";
    case Activation::silu: return "silu";
  }
  return "?";
}

/// Parses an activation name; "gelu_pytorch_tanh" is the authors' spelling of gelu_tanh.
inline Activation parse_activation(const std::string& name) {
  if (name == "relu") return Activation::relu;
  if (name == "gelu") return Activation::gelu;
  if (name == "gelu_tanh" || name == "gelu_pytorch_tanh") return Activation::gelu_tanh;
  if (name == "sigmoid") return Activation::sigmoid;
  if (name == "silu") return Activation::silu;
  throw Error("activation: unknown name '" + detail::printable(name) +
              "' (expected relu, gelu, gelu_tanh, gelu_pytorch_tanh, sigmoid or silu)");
}

/// The shape and options of one MxD layer. Letters as in the paper:
/// I = d_in, H = d_hidden, O = d_out, N = n_experts, k = experts selected per row.
struct Config {
  index_t d_in = 0;       // I
  index_t d_hidden = 0;   // H
  index_t d_out = 0;      // O
  index_t n_experts = 0;  // N
  index_t k = 0;          // experts kept per row by top-k gating
  Activation activation = Activation::relu;
  bool glu = false;   // z = (x W_glu^T + b_glu) * act(x E + b_enc)
  bool skip = false;  // y += x W_skip^T (needs d_in == d_out, as in the authors' code)

  /// Throws mxd::Error naming the first invalid field and its value.
  void validate() const {
    auto positive = [](const char* field, index_t v) {
      MXD_CHECK(v > 0, "Config.", field, " = ", v, " must be positive");
    };
    positive("d_in", d_in);
    positive("d_hidden", d_hidden);
    positive("d_out", d_out);
    positive("n_experts", n_experts);
    positive("k", k);
    MXD_CHECK(k <= n_experts, "Config.k = ", k, " exceeds Config.n_experts = ", n_experts);
    MXD_CHECK(n_experts <= INT32_MAX, "Config.n_experts = ", n_experts,
              " does not fit the 32-bit expert indices");
    MXD_CHECK(!skip || d_in == d_out, "Config.skip needs d_in == d_out, got d_in = ", d_in,
              " and d_out = ", d_out);
    switch (activation) {
      case Activation::relu: case Activation::gelu: case Activation::gelu_tanh:
      case Activation::sigmoid: case Activation::silu: break;
      default: throw Error(detail::concat("Config.activation = ", static_cast<int>(activation),
                                          " is not a known activation"));
    }
  }

  /// Number of trainable parameters (the authors' unused b_dec is not counted).
  index_t n_params() const {
    index_t p = d_in * d_hidden + d_hidden             // E, b_enc
                + d_hidden * d_out                     // D
                + n_experts * d_in + n_experts         // G, b_gate
                + n_experts * d_out + d_out;           // C, b_out
    if (glu) p += d_hidden * d_in + d_hidden;          // W_glu, b_glu
    if (skip) p += d_out * d_in;                       // W_skip
    return p;
  }
};

}  // namespace mxd
