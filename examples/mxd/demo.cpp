// SPDX-License-Identifier: MIT
// mxd demo: the built-in default job. Builds a seeded random MxD layer, runs forward and
// backward on a random batch, checks the factorised output against the explicit sum over the
// selected experts for one row, and prints sizes and timings.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>

#include <mxd/mxd.hpp>

#include "cli.hpp"
#include "commands.hpp"

namespace mxd::cli {

int run_demo(int argc, char** argv) {
  Args args(argc, argv, argc < 2 ? argc : 2, {"threads"});
  if (args.help()) {
    std::puts("usage: mxd demo [--threads N]\n\n"
              "Forward and backward of a seeded random layer (I = 256, H = 1024, O = 256,\n"
              "N = 4096 experts, k = 32, batch 512, float), with a check of the factorisation.");
    return 0;
  }
  Config cfg;
  cfg.d_in = 256; cfg.d_hidden = 1024; cfg.d_out = 256; cfg.n_experts = 4096; cfg.k = 32;
  cfg.activation = Activation::gelu;
  const index_t B = 512;
  std::mt19937_64 rng(42);
  std::normal_distribution<float> normal(0.f, 1.f);
  Params<float> p(cfg);
  p.for_each([&](const char*, Tensor<float>& t) {
    const float scale = 1.f / std::sqrt(static_cast<float>(t.cols()));
    for (index_t i = 0; i < t.size(); ++i) t[i] = scale * normal(rng);
  });
  Tensor<float> x(B, cfg.d_in), y(B, cfg.d_out), dy(B, cfg.d_out), dx(B, cfg.d_in);
  for (index_t i = 0; i < x.size(); ++i) x[i] = normal(rng);
  for (index_t i = 0; i < dy.size(); ++i) dy[i] = normal(rng);
  Workspace<float> ws;
  ws.ctx.threads = threads_arg(args);
  Grads<float> g(cfg);

  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  forward<float>(p, x.view(), y.view(), ws);
  const auto t1 = clock::now();
  backward<float>(p, x.view(), dy.view(), ws, g, dx.view());
  const auto t2 = clock::now();

  // y[0] = sum_j a_j (z D diag(c_j)) + b_out: the explicit sum over the selected experts.
  double worst = 0, scale = 0;
  for (index_t o = 0; o < cfg.d_out; ++o) {
    double u = 0, mixed = 0;
    for (index_t h = 0; h < cfg.d_hidden; ++h) u += double(ws.z(0, h)) * p.D(h, o);
    for (index_t j = 0; j < cfg.k; ++j)
      mixed += double(ws.topk_val(0, j)) * u * p.C(ws.topk_idx(0, j), o);
    worst = std::max(worst, std::abs(mixed + p.b_out[o] - y(0, o)));
    scale = std::max(scale, std::abs(double(y(0, o))));
  }
  const double ms_f = std::chrono::duration<double, std::milli>(t1 - t0).count();
  const double ms_b = std::chrono::duration<double, std::milli>(t2 - t1).count();
  std::printf("mxd demo: I=%lld H=%lld O=%lld N=%lld k=%lld, batch %lld, %lld parameters, %d threads\n",
              (long long)cfg.d_in, (long long)cfg.d_hidden, (long long)cfg.d_out,
              (long long)cfg.n_experts, (long long)cfg.k, (long long)B, (long long)cfg.n_params(),
              ws.ctx.resolved_threads());
  std::printf("  forward   %8.2f ms  (%.0f tokens/s)\n", ms_f, B / ms_f * 1e3);
  std::printf("  backward  %8.2f ms\n", ms_b);
  std::printf("  row 0: factorised output vs explicit sum of %lld experts: max error %.2e of %.2e\n",
              (long long)cfg.k, worst, scale);
  const bool ok = worst <= 1e-4 * (scale + 1);
  std::printf("  %s\n", ok ? "ok" : "MISMATCH");
  return ok ? 0 : 1;
}

}  // namespace mxd::cli
