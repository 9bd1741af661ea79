// SPDX-License-Identifier: MIT
// 05: steering. Forcing expert n on with coefficient v moves every output along
// z D diag(c_n) = z W_n: the change is exactly v * (z W_n), the expert's own map of the row.
//
// This is how the authors steer (adding 100 to an expert's coefficient). The program checks
// the movement against the explicit expert matrix and prints its size per row.
#include <cmath>
#include <cstdio>
#include <random>

#include <mxd/init.hpp>
#include <mxd/interp/experts.hpp>
#include <mxd/mxd.hpp>

int main() {
  mxd::Config cfg;
  cfg.d_in = 12; cfg.d_hidden = 48; cfg.d_out = 12; cfg.n_experts = 200; cfg.k = 4;
  cfg.activation = mxd::Activation::relu;
  mxd::Params<double> p(cfg);
  mxd::init_params(p, 5);
  std::mt19937_64 rng(6);
  std::normal_distribution<double> normal(0, 1);
  for (mxd::index_t i = 0; i < p.D.size(); ++i) p.D[i] = 0.2 * normal(rng);
  const mxd::index_t B = 4;
  mxd::Tensor<double> x(B, cfg.d_in), y(B, cfg.d_out), steered(B, cfg.d_out);
  for (mxd::index_t i = 0; i < x.size(); ++i) x[i] = normal(rng);

  mxd::Workspace<double> ws, ws_steered;
  mxd::forward(p, x.view(), y.view(), ws);
  const mxd::index_t n = 42;
  const double v = 100.0;
  mxd::Steering steering;
  steering.add(n, v);
  mxd::forward(p, x.view(), steered.view(), ws_steered, &steering);

  const mxd::Tensor<double> W = mxd::interp::expert_weight(p, n);  // D diag(c_n)
  bool ok = true;
  for (mxd::index_t b = 0; b < B; ++b) {
    // Was expert n already among row b's top-k? Then its coefficient grew by v too.
    double moved = 0, err = 0;
    for (mxd::index_t o = 0; o < cfg.d_out; ++o) {
      double zW = 0;
      for (mxd::index_t h = 0; h < cfg.d_hidden; ++h) zW += ws.z(b, h) * W(h, o);
      const double delta = steered(b, o) - y(b, o);
      moved += delta * delta;
      err = std::max(err, std::abs(delta - v * zW));
    }
    std::printf("row %lld: |y_steered - y| = %8.3f, off the direction z W_%lld by %.1e\n",
                (long long)b, std::sqrt(moved), (long long)n, err);
    ok = ok && err <= 1e-9 * (1 + std::sqrt(moved));
  }
  std::printf("%s\n", ok ? "ok: steering moves y along z D diag(c_n)" : "FAILED");
  return ok ? 0 : 1;
}
