// SPDX-License-Identifier: MIT
// 03: a dense MLP, and a GLU, are special cases of MxD.
//
// With one expert (N = k = 1) whose vector c is all ones and whose gate always gives 1,
// y = (z D) * 1 + b_out is exactly the dense layer z D + b. The GLU variant of MxD likewise
// contains the GLU y = (act(x W1 + b1) * (x Wg^T + bg)) W2 + b2. mxd::interp builds both;
// this program checks them against a plain loop implementation of the dense layers.
#include <cmath>
#include <cstdio>
#include <random>

#include <mxd/interp/special_cases.hpp>
#include <mxd/mxd.hpp>

using mxd::index_t;
using Mat = mxd::Tensor<double>;

int main() {
  const index_t I = 10, H = 40, O = 8, B = 6;
  std::mt19937_64 rng(3);
  std::normal_distribution<double> normal(0, 1);
  auto random = [&](index_t r, index_t c) {
    Mat m(r, c);
    for (index_t i = 0; i < m.size(); ++i) m[i] = normal(rng) / std::sqrt(double(c));
    return m;
  };
  const Mat W1 = random(I, H), b1 = random(1, H), Wg = random(H, I), bg = random(1, H);
  const Mat W2 = random(H, O), b2 = random(1, O), x = random(B, I);
  const auto act = mxd::Activation::gelu;

  bool ok = true;
  for (bool glu : {false, true}) {
    const mxd::Params<double> p = glu ? mxd::interp::mxd_from_glu(W1, b1, Wg, bg, W2, b2, act)
                                      : mxd::interp::mxd_from_mlp(W1, b1, W2, b2, act);
    Mat y(B, O);
    mxd::Workspace<double> ws;
    mxd::forward(p, x.view(), y.view(), ws);
    double worst = 0;
    for (index_t r = 0; r < B; ++r)
      for (index_t o = 0; o < O; ++o) {
        double s = b2[o];
        for (index_t h = 0; h < H; ++h) {
          double pre = b1[h], gate = bg[h];
          for (index_t i = 0; i < I; ++i) {
            pre += x(r, i) * W1(i, h);
            gate += x(r, i) * Wg(h, i);
          }
          s += (glu ? gate : 1.0) * mxd::activate(act, pre) * W2(h, o);
        }
        worst = std::max(worst, std::abs(s - y(r, o)));
      }
    std::printf("%s as an MxD with %lld expert: max difference %.2e\n", glu ? "GLU" : "dense MLP",
                (long long)p.config.n_experts, worst);
    ok = ok && worst <= 1e-13;  // only the order of the sums differs
  }
  std::printf("%s\n", ok ? "ok: both are special cases of MxD" : "FAILED");
  return ok ? 0 : 1;
}
