// SPDX-License-Identifier: MIT
// 01: the factorised forward equals the explicit sum over the k selected experts.
//
// MxD computes y = (z D) * (sum_j a_j c_{idx_j}) + b_out with one shared decoder D. Written
// out, that is a sparse mixture of k full linear maps W_n = D diag(c_n):
//     y = sum_j a_j (z W_{idx_j}) + b_out.
// This program builds a random layer, runs mxd::forward, rebuilds every row from the explicit
// expert matrices, and checks both agree. It does not train anything.
#include <cmath>
#include <cstdio>
#include <random>

#include <mxd/interp/experts.hpp>
#include <mxd/mxd.hpp>

int main() {
  mxd::Config cfg;
  cfg.d_in = 16; cfg.d_hidden = 64; cfg.d_out = 12; cfg.n_experts = 300; cfg.k = 8;
  cfg.activation = mxd::Activation::gelu;

  std::mt19937_64 rng(1);
  std::normal_distribution<double> normal(0, 1);
  mxd::Params<double> p(cfg);
  p.for_each([&](const char*, mxd::Tensor<double>& t) {
    for (mxd::index_t i = 0; i < t.size(); ++i) t[i] = normal(rng) / std::sqrt(double(t.cols()));
  });
  for (mxd::index_t n = 0; n < cfg.n_experts; ++n) p.b_gate[n] += 0.3;  // most gates open

  const mxd::index_t B = 5;
  mxd::Tensor<double> x(B, cfg.d_in), y(B, cfg.d_out);
  for (mxd::index_t i = 0; i < x.size(); ++i) x[i] = normal(rng);
  mxd::Workspace<double> ws;
  mxd::forward(p, x.view(), y.view(), ws);  // fills ws.z and the top-k selection

  double worst = 0, scale = 0;
  for (mxd::index_t b = 0; b < B; ++b) {
    std::printf("row %lld uses experts", (long long)b);
    std::vector<double> sum(cfg.d_out, 0.0);
    for (mxd::index_t j = 0; j < cfg.k; ++j) {
      const mxd::index_t n = ws.topk_idx(b, j);
      const double a = ws.topk_val(b, j);
      std::printf(" %lld(%.2f)", (long long)n, a);
      const mxd::Tensor<double> W = mxd::interp::expert_weight(p, n);  // D diag(c_n): [H, O]
      for (mxd::index_t o = 0; o < cfg.d_out; ++o)
        for (mxd::index_t h = 0; h < cfg.d_hidden; ++h) sum[o] += a * ws.z(b, h) * W(h, o);
    }
    std::printf("\n");
    for (mxd::index_t o = 0; o < cfg.d_out; ++o) {
      worst = std::max(worst, std::abs(sum[o] + p.b_out[o] - y(b, o)));
      scale = std::max(scale, std::abs(y(b, o)));
    }
  }
  std::printf("max |factorised - explicit sum of %lld experts| = %.2e (outputs up to %.2f)\n",
              (long long)cfg.k, worst, scale);
  const bool ok = worst <= 1e-12 * scale;
  std::printf("%s\n", ok ? "ok: y = sum_j a_j z D diag(c_j) + b_out" : "FAILED");
  return ok ? 0 : 1;
}
