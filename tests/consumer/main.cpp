// SPDX-License-Identifier: MIT
// Builds against the installed package: one forward pass of a tiny MxD layer.
#include <mxd/mxd.hpp>

#include <cstdio>

int main() {
  mxd::Config cfg;
  cfg.d_in = 4; cfg.d_hidden = 8; cfg.d_out = 4; cfg.n_experts = 6; cfg.k = 2;
  mxd::Params<float> p(cfg);
  p.b_out(0, 1) = 3.f;  // D = 0 makes u = 0, so y = b_out exactly
  mxd::Tensor<float> x(2, 4), y(2, 4);
  mxd::Workspace<float> ws;
  mxd::forward(p, x.view(), y.view(), ws);
  std::printf("y[1][1] = %g\n", y(1, 1));
  return y(1, 1) == 3.f ? 0 : 1;
}
