// SPDX-License-Identifier: MIT
// Interpretability toolkit: expert matrices and ranks, usage statistics, top examples,
// steering (forward and backward), sparse probing, and the dense special cases.
#include <doctest/doctest.h>

#include <mxd/interp/experts.hpp>
#include <mxd/interp/probe.hpp>
#include <mxd/interp/special_cases.hpp>
#include <mxd/interp/usage.hpp>

#include "testing.hpp"

using namespace mxd;
using namespace mxd_test;

namespace {

Config small_config() {
  Config c;
  c.d_in = 6; c.d_hidden = 9; c.d_out = 5; c.n_experts = 12; c.k = 3;
  c.activation = Activation::gelu;
  return c;
}

}  // namespace

TEST_CASE("expert matrices are D diag(c_n) and have the rank of D") {
  Config c = small_config();
  Params<double> p = random_params<double>(c, 1);
  // D of rank 3: a product of [9, 3] and [3, 5] factors.
  Tensor<double> a = random_matrix<double>(9, 3, 2), b = random_matrix<double>(3, 5, 3);
  for (index_t h = 0; h < 9; ++h)
    for (index_t o = 0; o < 5; ++o) {
      double s = 0;
      for (int i = 0; i < 3; ++i) s += a(h, i) * b(i, o);
      p.D(h, o) = s;
    }
  const Tensor<double> W = interp::expert_weight(p, 4);
  CHECK(W(2, 3) == p.D(2, 3) * p.C(4, 3));
  CHECK(interp::rank(W) == 3);
  std::vector<index_t> all(12);
  for (index_t n = 0; n < 12; ++n) all[n] = n;
  CHECK(interp::experts_below_rank_of_D(p, all).empty());
  CHECK(interp::rank(Tensor<double>(4, 4)) == 0);
  Tensor<double> eye(4, 4);
  for (int i = 0; i < 4; ++i) eye(i, i) = 1;
  CHECK(interp::rank(eye) == 4);
  CHECK(error_of([&] { interp::expert_weight(p, 12); }).find("expert 12 is outside") != std::string::npos);
}

TEST_CASE("usage statistics on a hand-made selection") {
  // Two batches over 5 experts; zero values do not count as firing.
  Tensor<std::int32_t> idx(2, 2);
  Tensor<double> val(2, 2);
  idx[0] = 0; idx[1] = 1; idx[2] = 0; idx[3] = 3;
  val[0] = 2; val[1] = 1; val[2] = 4; val[3] = 0;
  interp::Usage u(5);
  u.add(idx, val);
  u.add(idx, val);
  CHECK(u.rows() == 4);
  CHECK(u.count(0) == 4);
  CHECK(u.count(1) == 2);
  CHECK(u.count(3) == 0);
  CHECK(u.frequency(0) == 1.0);
  CHECK(u.frequency(1) == 0.5);
  CHECK(u.mean_coefficient(0) == 3.0);
  CHECK(u.dead() == std::vector<index_t>{2, 3, 4});
  CHECK(u.dead_fraction() == 0.6);
  // Selections 4 and 2 of 6: entropy = -(2/3 ln 2/3 + 1/3 ln 1/3).
  CHECK(u.entropy() == doctest::Approx(-(2.0 / 3 * std::log(2.0 / 3) + 1.0 / 3 * std::log(1.0 / 3))));
  CHECK(u.most_used(2) == std::vector<index_t>{0, 1});
  const auto h = u.log10_histogram(2, -1, 0);  // log10 0.5 = -0.30 -> bin 1, log10 1 = 0 -> bin 1
  CHECK(h == std::vector<index_t>{0, 2});
}

TEST_CASE("top examples keep the largest values per expert in order") {
  interp::TopExamples top(3, 2);
  Tensor<std::int32_t> idx(4, 1);
  Tensor<double> val(4, 1);
  const double v[4] = {0.5, 3.0, 1.0, 3.0};
  for (int r = 0; r < 4; ++r) {
    idx[r] = 1;
    val[r] = v[r];
  }
  top.add(100, idx, val);
  const auto t = top.top(1);
  REQUIRE(t.size() == 2);
  CHECK(t[0].row == 101);  // ties broken by the smaller row id
  CHECK(t[1].row == 103);
  CHECK(t[0].value == 3.0);
  CHECK(top.top(0).empty());
}

TEST_CASE("steering moves the output along D diag(c_n) z and ablation removes an expert") {
  Config c = small_config();
  const Params<double> p = random_params<double>(c, 5);
  const Tensor<double> x = random_matrix<double>(4, 6, 6);
  Tensor<double> y(4, 5), ys(4, 5);
  Workspace<double> ws, wss;
  forward(p, x.view(), y.view(), ws);
  // An expert none of the rows selected: adding 100 adds 100 * u * c_n to every row.
  std::vector<int> used(c.n_experts, 0);
  for (index_t i = 0; i < ws.topk_idx.size(); ++i) used[ws.topk_idx[i]] |= ws.topk_val[i] > 0;
  index_t off = 0;
  while (used[off]) ++off;
  Steering s;
  s.add(off, 100.0);
  forward(p, x.view(), ys.view(), wss, &s);
  double worst = 0;
  for (index_t r = 0; r < 4; ++r)
    for (index_t o = 0; o < 5; ++o)
      worst = std::max(worst, std::abs(ys(r, o) - y(r, o) - 100.0 * ws.u(r, o) * p.C(off, o)));
  CHECK(worst <= 1e-11);

  // Zeroing row 0's best expert equals removing its term from v.
  const index_t best = ws.topk_idx(0, 0);
  Steering z;
  z.zero(best);
  forward(p, x.view(), ys.view(), wss, &z);
  for (index_t o = 0; o < 5; ++o)
    CHECK(ys(0, o) == doctest::Approx(y(0, o) - ws.u(0, o) * ws.topk_val(0, 0) * p.C(best, o)).epsilon(1e-12));
  CHECK(error_of([&] { Steering b; b.add(99, 1); forward(p, x.view(), ys.view(), wss, &b); })
            .find("expert 99 is outside") != std::string::npos);
}

TEST_CASE("backward of a steered forward matches finite differences") {
  Config c = small_config();
  Params<double> p = random_params<double>(c, 7);
  Tensor<double> x = random_matrix<double>(3, 6, 8), dy = random_matrix<double>(3, 5, 9);
  Workspace<double> ws;
  Tensor<double> y(3, 5);
  forward(p, x.view(), y.view(), ws);
  Steering s;
  s.add(ws.topk_idx(0, 0), 0.7).clamp(ws.topk_idx(1, 1), 2.0).zero(ws.topk_idx(2, 0)).add(11, 5.0);
  auto L = [&](std::vector<std::int32_t>* state) {
    Workspace<double> w;
    Tensor<double> out(3, 5);
    forward(p, x.view(), out.view(), w, &s);
    if (state) {
      state->assign(w.topk_idx.data(), w.topk_idx.data() + w.topk_idx.size());
      for (index_t i = 0; i < w.topk_val.size(); ++i) state->push_back(w.topk_val[i] > 0);
    }
    double l = 0;
    for (index_t i = 0; i < out.size(); ++i) l += out[i] * dy[i];
    return l;
  };
  forward(p, x.view(), y.view(), ws, &s);
  Grads<double> g(c);
  backward(p, x.view(), dy.view(), ws, g);
  std::vector<std::int32_t> base;
  L(&base);
  int checked = 0;
  for (auto [v, gr] : {std::pair{&p.G, &g.G}, std::pair{&p.C, &g.C}, std::pair{&p.b_gate, &g.b_gate},
                       std::pair{&p.E, &g.E}})
    for (index_t i = 0; i < v->size(); ++i) {
      const double keep = (*v)[i], eps = 1e-5;
      std::vector<std::int32_t> su, sd;
      (*v)[i] = keep + eps;
      const double up = L(&su);
      (*v)[i] = keep - eps;
      const double down = L(&sd);
      (*v)[i] = keep;
      if (su != base || sd != base) continue;
      CHECK(std::abs((up - down) / (2 * eps) - (*gr)[i]) <= 1e-7 * (1 + std::abs((*gr)[i])));
      ++checked;
    }
  CHECK(checked > 150);
}

TEST_CASE("steering sets no gate gradient for set or forced experts and passes it for added ones") {
  Config c = small_config();
  const Params<double> p = random_params<double>(c, 21);
  const Tensor<double> x = random_matrix<double>(1, 6, 22), dy = random_matrix<double>(1, 5, 23);
  Tensor<double> y(1, 5);
  auto grads = [&](const Steering* s) {
    Workspace<double> ws;
    forward(p, x.view(), y.view(), ws, s);
    Grads<double> g(c);
    backward(p, x.view(), dy.view(), ws, g);
    return std::pair{g, ws};
  };
  const auto [g0, ws0] = grads(nullptr);
  const index_t sel = ws0.topk_idx(0, 0);
  REQUIRE(ws0.topk_val(0, 0) > 0);
  std::vector<int> used(c.n_experts, 0);
  for (index_t j = 0; j < c.k; ++j) used[ws0.topk_idx(0, j)] = 1;
  index_t off = 0;
  while (used[off]) ++off;
  // dv = dy * u does not depend on the coefficients, so gradients compare exactly.
  const double dv0 = dy[0] * ws0.u(0, 0);

  Steering add;
  add.add(sel, 0.5);
  const auto [ga, wsa] = grads(&add);
  for (index_t i = 0; i < c.d_in; ++i) CHECK(ga.G(sel, i) == g0.G(sel, i));
  CHECK(ga.b_gate[sel] == g0.b_gate[sel]);
  CHECK(ga.C(sel, 0) == doctest::Approx((ws0.topk_val(0, 0) + 0.5) * dv0).epsilon(1e-12));

  Steering set;
  set.clamp(sel, 2.0);
  const auto [gs, wss] = grads(&set);
  for (index_t i = 0; i < c.d_in; ++i) CHECK(gs.G(sel, i) == 0.0);
  CHECK(gs.b_gate[sel] == 0.0);
  CHECK(gs.C(sel, 0) == doctest::Approx(2.0 * dv0).epsilon(1e-12));

  Steering forced;
  forced.add(off, 3.0);
  const auto [gf, wsf] = grads(&forced);
  for (index_t i = 0; i < c.d_in; ++i) CHECK(gf.G(off, i) == 0.0);
  CHECK(gf.b_gate[off] == 0.0);
  CHECK(gf.C(off, 0) == doctest::Approx(3.0 * dv0).epsilon(1e-12));
}

TEST_CASE("edits of one expert compose in order") {
  Config c = small_config();
  const Params<double> p = random_params<double>(c, 31);
  const Tensor<double> x = random_matrix<double>(4, 6, 32);
  Tensor<double> y(4, 5), ya(4, 5), yb(4, 5);
  Workspace<double> ws;
  forward(p, x.view(), y.view(), ws);
  const index_t n = ws.topk_idx(0, 0);
  Steering add_then_zero, zero_then_set, set;
  add_then_zero.add(n, 5.0).zero(n);
  zero_then_set.zero(n).add(n, 5.0);
  set.clamp(n, 5.0);
  Tensor<double> yz(4, 5);
  Steering z;
  z.zero(n);
  forward(p, x.view(), yz.view(), ws, &z);
  forward(p, x.view(), ya.view(), ws, &add_then_zero);
  CHECK(rel_error(ya.data(), yz.data(), ya.size()) == 0.0);
  forward(p, x.view(), ya.view(), ws, &zero_then_set);
  forward(p, x.view(), yb.view(), ws, &set);
  CHECK(rel_error(ya.data(), yb.data(), ya.size()) <= 1e-15);
}

TEST_CASE("pooled coefficients are per-example means of the selection") {
  Tensor<std::int32_t> idx(3, 2);
  Tensor<double> val(3, 2);
  idx(0, 0) = 1; idx(0, 1) = 2; val(0, 0) = 2; val(0, 1) = 4;
  idx(1, 0) = 1; idx(1, 1) = 0; val(1, 0) = 6; val(1, 1) = 1;
  idx(2, 0) = 3; idx(2, 1) = 2; val(2, 0) = 5; val(2, 1) = 0;
  interp::PooledCoefficients pool(3, 4);
  pool.add({0, 0, 1}, idx, val);  // example 0 has rows 0 and 1, example 1 row 2, example 2 none
  const Tensor<double> f = pool.features();
  CHECK(f(0, 0) == 0.5);
  CHECK(f(0, 1) == 4.0);
  CHECK(f(0, 2) == 2.0);
  CHECK(f(1, 3) == 5.0);
  CHECK(f(1, 2) == 0.0);
  CHECK(f(2, 1) == 0.0);
  CHECK(error_of([&] { pool.add({0, 0, 3}, idx, val); }).find("example id 3") != std::string::npos);
}

TEST_CASE("sparse probing finds the planted feature of each class") {
  const index_t S = 300, F = 20;
  Tensor<double> feats = random_matrix<double>(S, F, 10);
  std::vector<std::int64_t> labels(S);
  for (index_t s = 0; s < S; ++s) {
    labels[s] = s % 3;
    feats(s, 5) += labels[s] == 1 ? 4.0 : 0.0;   // class 1 lives on feature 5
    feats(s, 12) -= labels[s] == 2 ? 4.0 : 0.0;  // class 2 on feature 12 (negatively)
  }
  const auto rows = interp::sparse_probe(feats, labels, 4);
  REQUIRE(rows.size() == 3);
  CHECK(rows[1].feature == 5);
  CHECK(rows[1].f1 > 0.9);
  CHECK(rows[1].balanced_accuracy > 0.9);
  CHECK(rows[2].feature == 12);
  CHECK(rows[2].weight < 0);
  CHECK(rows[2].f1 > 0.9);
  std::vector<std::int64_t> one(S, 0);
  CHECK(error_of([&] { interp::sparse_probe(feats, one); }).find("all examples have label 0") != std::string::npos);
}

TEST_CASE("a dense MLP and a GLU are MxDs with one expert, exact to rounding") {
  const index_t I = 5, H = 7, O = 4, B = 3;
  Tensor<double> W1 = random_matrix<double>(I, H, 11), b1 = random_matrix<double>(1, H, 12);
  Tensor<double> W2 = random_matrix<double>(H, O, 13), b2 = random_matrix<double>(1, O, 14);
  Tensor<double> Wg = random_matrix<double>(H, I, 15), bg = random_matrix<double>(1, H, 16);
  const Tensor<double> x = random_matrix<double>(B, I, 17);
  for (bool glu : {false, true}) {
    CAPTURE(glu);
    const Params<double> p = glu ? interp::mxd_from_glu(W1, b1, Wg, bg, W2, b2, Activation::silu)
                                 : interp::mxd_from_mlp(W1, b1, W2, b2, Activation::silu);
    Tensor<double> y(B, O);
    Workspace<double> ws;
    forward(p, x.view(), y.view(), ws);
    Tensor<double> want(B, O);
    for (index_t r = 0; r < B; ++r)
      for (index_t o = 0; o < O; ++o) {
        double s = b2[o];
        for (index_t h = 0; h < H; ++h) {
          double pre = b1[h], gate = bg[h];
          for (index_t i = 0; i < I; ++i) {
            pre += x(r, i) * W1(i, h);
            gate += x(r, i) * Wg(h, i);
          }
          s += (glu ? gate : 1.0) * activate(Activation::silu, pre) * W2(h, o);
        }
        want(r, o) = s;
      }
    CHECK(rel_error(y.data(), want.data(), want.size()) <= 1e-14);  // summation order only
  }
}
