// SPDX-License-Identifier: MIT
// The benchmarked layers and their useful FLOPs, shared by the CPU and GPU suites.
#pragma once

#include <mxd/config.hpp>

namespace mxd_bench {

// 0: GPT-2 small (768 -> 3072 -> 768, 21504 experts), 1: small (256 -> 1024 -> 256, 4096); k = 32.
inline mxd::Config layer_config(int which) {
  mxd::Config c;
  if (which == 0) {
    c.d_in = 768; c.d_hidden = 3072; c.d_out = 768; c.n_experts = 21504; c.k = 32;
  } else {
    c.d_in = 256; c.d_hidden = 1024; c.d_out = 256; c.n_experts = 4096; c.k = 32;
  }
  c.activation = mxd::Activation::gelu;
  return c;
}

// Useful FLOPs per token: the dense encoder, decoder and gate GEMMs, plus O(k) expert work.
inline double forward_flops(const mxd::Config& c) {
  return 2.0 * c.d_in * c.d_hidden + 2.0 * c.d_hidden * c.d_out + 2.0 * c.d_in * c.n_experts +
         2.0 * c.k * c.d_out;
}
inline double backward_flops(const mxd::Config& c) {
  return 4.0 * c.d_in * c.d_hidden + 4.0 * c.d_hidden * c.d_out +
         2.0 * c.k * (2.0 * c.d_out + 2.0 * c.d_in);
}

}  // namespace mxd_bench
