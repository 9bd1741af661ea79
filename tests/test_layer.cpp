// SPDX-License-Identifier: MIT
// The layer against the golden files, against finite differences, and its error paths,
// determinism and gradient-accumulation rule.
#include <doctest/doctest.h>

#include <cstring>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "testing.hpp"

// The backend contract (backend.hpp): every primitive with its signature, on the host.
static_assert(mxd::backend_contract_holds<mxd::cpu, float>() &&
              mxd::backend_contract_holds<mxd::cpu, double>());

using namespace mxd;
using namespace mxd_test;
using io::SafetensorsReader;

namespace {

template <class T>
struct Run {
  Params<T> p;
  Tensor<T> x, dy, y, dx;
  Workspace<T> ws;
  Grads<T> g;

  Run(Params<T> params, Tensor<T> x_, Tensor<T> dy_, int threads = 0)
      : p(std::move(params)), x(std::move(x_)), dy(std::move(dy_)),
        y(x.rows(), p.config.d_out), dx(x.rows(), p.config.d_in), g(p.config) {
    ws.ctx.threads = threads;
  }
  void forward() { mxd::forward<T>(p, x.view(), y.view(), ws); }
  void backward(GradMode mode = GradMode::Overwrite) {
    mxd::backward<T>(p, x.view(), dy.view(), ws, g, dx.view(), mode);
  }
};

template <class T>
Run<T> golden_run(SafetensorsReader& f) {
  const Config cfg = io::read_config(f);
  return Run<T>(io::load_params<T>(f, cfg), io::read_matrix<T>(f, "x", cfg.d_in),
                io::read_matrix<T>(f, "dy", cfg.d_out));
}

}  // namespace

TEST_CASE_TEMPLATE("golden cases: forward output and top-k selection match the reference", T,
                   float, double) {
  for (const std::string& name : golden_cases()) {
    CAPTURE(name);
    SafetensorsReader f(data_path(name + ".safetensors"));
    Run<T> r = golden_run<T>(f);
    r.forward();
    const auto y = f.read_all<double>("y");
    CHECK(rel_error(r.y.data(), y.data(), y.size()) <= tolerance<T>());

    const auto idx = f.read_all<std::int64_t>("topk_indices");
    const auto val = f.read_all<double>("topk_values");
    REQUIRE(idx.size() == static_cast<std::size_t>(r.ws.topk_idx.size()));
    CHECK(rel_error(r.ws.topk_val.data(), val.data(), val.size()) <= tolerance<T>());
    // Indices are defined only where the selected score is positive.
    int positive = 0, equal = 0;
    for (std::size_t i = 0; i < idx.size(); ++i)
      if (val[i] > 0) {
        ++positive;
        equal += r.ws.topk_idx.data()[i] == idx[i];
      }
    CHECK(equal == positive);
  }
}

TEST_CASE_TEMPLATE("golden cases: every gradient and dx match the reference", T, float, double) {
  for (const std::string& name : golden_cases()) {
    CAPTURE(name);
    SafetensorsReader f(data_path(name + ".safetensors"));
    Run<T> r = golden_run<T>(f);
    r.forward();
    r.backward();
    const auto gx = f.read_all<double>("grad.x");
    CHECK(rel_error(r.dx.data(), gx.data(), gx.size()) <= tolerance<T>());
    const auto errors = golden_grad_errors(f, r.g);
    for (const auto& [pname, error] : errors) {
      CAPTURE(pname);
      CHECK(error <= tolerance<T>());
    }
    CHECK(errors.size() == 7u + 2 * r.p.config.glu + r.p.config.skip);
  }
}

namespace {

// L(params, x) = sum(y * dy), and the discrete state the gradient is defined within: the
// selected experts, which of them are positive, and (for relu) the sign of every hpre.
struct Probe {
  double loss;
  std::vector<std::int32_t> state;
};

Probe probe(Run<double>& r) {
  r.forward();
  Probe pr{0, {}};
  for (index_t i = 0; i < r.y.size(); ++i) pr.loss += r.y[i] * r.dy[i];
  for (index_t i = 0; i < r.ws.topk_idx.size(); ++i) {
    pr.state.push_back(r.ws.topk_idx.data()[i]);
    pr.state.push_back(r.ws.topk_val.data()[i] > 0);
  }
  if (r.p.config.activation == Activation::relu)
    for (index_t i = 0; i < r.ws.hpre.size(); ++i) pr.state.push_back(r.ws.hpre.data()[i] > 0);
  return pr;
}

}  // namespace

TEST_CASE("analytic gradients match central finite differences for every variant") {
  const double eps = 1e-5;
  // Truncation error ~eps^2 |L'''| ~ 1e-10 and rounding ~1e-16 |L| / eps ~ 1e-11, so 1e-7 is
  // far above the noise and far below any missing or wrong term.
  const double tol = 1e-7;
  std::uint64_t seed = 1;
  for (Activation act : {Activation::relu, Activation::gelu, Activation::gelu_tanh,
                         Activation::sigmoid, Activation::silu})
    for (bool glu : {false, true})
      for (bool skip : {false, true}) {
        Config c;
        c.d_in = 5; c.d_hidden = 7; c.d_out = 5; c.n_experts = 13; c.k = 4;
        c.activation = act; c.glu = glu; c.skip = skip;
        CAPTURE(activation_name(act));
        CAPTURE(glu);
        CAPTURE(skip);
        ++seed;
        Run<double> r(random_params<double>(c, seed), random_matrix<double>(3, 5, seed + 100),
                      random_matrix<double>(3, 5, seed + 200));
        const Probe base = probe(r);
        r.backward();

        std::vector<std::pair<Tensor<double>*, Tensor<double>*>> pairs;  // (value, gradient)
        std::vector<Tensor<double>*> grads;
        r.g.for_each([&](const char*, Tensor<double>& t) { grads.push_back(&t); });
        std::size_t n = 0;
        r.p.for_each([&](const char*, Tensor<double>& t) { pairs.push_back({&t, grads[n++]}); });
        pairs.push_back({&r.x, &r.dx});

        int checked = 0, skipped = 0;
        for (auto [value, grad] : pairs)
          for (index_t i = 0; i < value->size(); ++i) {
            const double keep = (*value)[i];
            (*value)[i] = keep + eps;
            const Probe up = probe(r);
            (*value)[i] = keep - eps;
            const Probe down = probe(r);
            (*value)[i] = keep;
            if (up.state != base.state || down.state != base.state) {
              ++skipped;  // a kink (top-k swap or relu) lies within eps: no derivative there
              continue;
            }
            const double fd = (up.loss - down.loss) / (2 * eps), an = (*grad)[i];
            CHECK(std::abs(fd - an) <= tol * (1 + std::abs(an)));
            ++checked;
          }
        CHECK(skipped * 20 < checked);
      }
}

TEST_CASE("forward and backward give identical bits for 1, 2 and 4 threads and on repeat runs") {
  Config c;
  c.d_in = 48; c.d_hidden = 300; c.d_out = 40; c.n_experts = 1500; c.k = 24;
  c.activation = Activation::gelu; c.glu = true;
  auto make = [&](int threads) {
    Run<float> r(random_params<float>(c, 7), random_matrix<float>(600, 48, 8),
                 random_matrix<float>(600, 40, 9), threads);
    r.forward();
    r.backward();
    return r;
  };
  Run<float> a = make(1), b = make(2), a2 = make(1), d = make(4);
  auto same = [](const Tensor<float>& u, const Tensor<float>& v) {
    return u.size() == v.size() && std::memcmp(u.data(), v.data(), u.bytes()) == 0;
  };
  CHECK(same(a.y, b.y));
  CHECK(same(a.dx, b.dx));
  CHECK(same(a.y, a2.y));
  CHECK(same(a.y, d.y));
  CHECK(same(a.dx, d.dx));
  std::vector<const Tensor<float>*> ga, gb, gd;
  a.g.for_each([&](const char*, const Tensor<float>& t) { ga.push_back(&t); });
  b.g.for_each([&](const char*, const Tensor<float>& t) { gb.push_back(&t); });
  d.g.for_each([&](const char*, const Tensor<float>& t) { gd.push_back(&t); });
  for (std::size_t i = 0; i < ga.size(); ++i) {
    CHECK(same(*ga[i], *gb[i]));
    CHECK(same(*ga[i], *gd[i]));
  }
}

namespace {

bool same_bits(const Tensor<float>& u, const Tensor<float>& v) {
  return u.rows() == v.rows() && u.cols() == v.cols() &&
         std::memcmp(u.data(), v.data(), u.bytes()) == 0;
}

// A batch of 700 rows: six tiles of 128 and a ragged one, or one tile of 700.
Config tiled_config() {
  Config c;
  c.d_in = 40; c.d_hidden = 300; c.d_out = 40; c.n_experts = 1100; c.k = 12;
  c.activation = Activation::gelu; c.glu = true; c.skip = true;
  return c;
}

}  // namespace

TEST_CASE("gate-score tiles of any height (and the automatic one) give identical bits") {
  const Config c = tiled_config();
  auto run = [&](index_t tile_rows, int threads) {
    Run<float> r(random_params<float>(c, 21), random_matrix<float>(700, c.d_in, 22),
                 random_matrix<float>(700, c.d_out, 23), threads);
    r.ws.tile_rows = tile_rows;
    r.forward();
    r.backward();
    return r;
  };
  Run<float> whole = run(0, 2);  // 700 x 1100 floats fit the automatic tile: one tile
  CHECK(whole.ws.scores.rows() == 700);
  for (index_t tile : {1, 128, 300, 640}) {
    CAPTURE(tile);
    Run<float> t = run(tile, tile == 300 ? 1 : 2);
    CHECK(t.ws.scores.rows() == std::max<index_t>(128, (tile + 127) / 128 * 128));
    CHECK(same_bits(t.y, whole.y));
    CHECK(same_bits(t.dx, whole.dx));
    std::vector<const Tensor<float>*> gw, gt;
    whole.g.for_each([&](const char*, const Tensor<float>& x) { gw.push_back(&x); });
    t.g.for_each([&](const char*, const Tensor<float>& x) { gt.push_back(&x); });
    for (std::size_t i = 0; i < gw.size(); ++i) CHECK(same_bits(*gt[i], *gw[i]));
    for (index_t i = 0; i < t.ws.topk_idx.size(); ++i)
      REQUIRE(t.ws.topk_idx[i] == whole.ws.topk_idx[i]);
  }
}

TEST_CASE("infer gives forward's output bit for bit, steered or not, holding one tile") {
  const Config c = tiled_config();
  const Params<float> p = random_params<float>(c, 31);
  const Tensor<float> x = random_matrix<float>(700, c.d_in, 32);
  Steering steer;
  steer.add(5, 3.0).zero(7).clamp(900, -1.5);
  const Steering* const cases[] = {nullptr, &steer};
  for (const Steering* s : cases) {
    Workspace<float> trained, served;
    served.tile_rows = 200;  // rounds up to 256: tiles of 256, 256 and 188 rows
    Tensor<float> y(700, c.d_out), yi(700, c.d_out);
    forward(p, x.view(), y.view(), trained, s);
    infer(p, x.view(), yi.view(), served, s);
    CHECK(same_bits(yi, y));
    CHECK(served.hpre.rows() == 256);
    CHECK(served.scores.rows() == 256);
    CHECK(served.bytes() < trained.bytes());
    Tensor<float> dx(700, c.d_in);
    Grads<float> g(c);
    // infer leaves no cache for backward to misuse.
    CHECK(error_of([&] { backward(p, x.view(), x.view(), served, g, dx.view()); })
              .find("call forward on this batch first") != std::string::npos);
  }
}

TEST_CASE("a non-finite gate score in a later tile is reported by its row in the batch") {
  const Config c = tiled_config();
  const Params<float> p = random_params<float>(c, 41);
  Tensor<float> x = random_matrix<float>(700, c.d_in, 42), y(700, c.d_out);
  x(650, 3) = std::numeric_limits<float>::quiet_NaN();
  x(400, 0) = std::numeric_limits<float>::infinity();
  for (index_t tile : {0, 128}) {
    Workspace<float> ws;
    ws.tile_rows = tile;
    CHECK(error_of([&] { forward(p, x.view(), y.view(), ws); }) ==
          "gate scores: non-finite value at row 400 (expert 0)");
    CHECK(error_of([&] { infer(p, x.view(), y.view(), ws); }) ==
          "gate scores: non-finite value at row 400 (expert 0)");
  }
}

TEST_CASE("Accumulate adds this batch's gradients to what the buffers hold") {
  Config c;
  c.d_in = 6; c.d_hidden = 10; c.d_out = 6; c.n_experts = 20; c.k = 5; c.skip = true;
  Run<double> r(random_params<double>(c, 3), random_matrix<double>(4, 6, 4),
                random_matrix<double>(4, 6, 5));
  r.forward();
  r.backward(GradMode::Overwrite);
  Grads<double> once = r.g;
  r.backward(GradMode::Accumulate);
  std::vector<const Tensor<double>*> g1, g2;
  once.for_each([&](const char*, const Tensor<double>& t) { g1.push_back(&t); });
  r.g.for_each([&](const char*, const Tensor<double>& t) { g2.push_back(&t); });
  for (std::size_t i = 0; i < g1.size(); ++i) {
    Tensor<double> twice = *g1[i];
    for (index_t j = 0; j < twice.size(); ++j) twice[j] *= 2;
    CHECK(rel_error(g2[i]->data(), twice.data(), twice.size()) <= 1e-14);
  }
  r.backward(GradMode::Overwrite);  // and Overwrite forgets it again
  for (std::size_t i = 0; i < g1.size(); ++i)
    CHECK(rel_error(g2[i]->data(), g1[i]->data(), g1[i]->size()) <= 1e-14);
}

TEST_CASE("fewer positive gate scores than k leave zero-valued slots that change nothing") {
  Config c;
  c.d_in = 4; c.d_hidden = 6; c.d_out = 3; c.n_experts = 8; c.k = 5;
  Params<double> p = random_params<double>(c, 11);
  for (index_t n = 0; n < c.n_experts; ++n) p.b_gate[n] = n < 2 ? 10.0 : -10.0;  // two positive
  Run<double> r(std::move(p), random_matrix<double>(2, 4, 12), random_matrix<double>(2, 3, 13));
  r.forward();
  for (index_t b = 0; b < 2; ++b) {
    CHECK(r.ws.topk_val(b, 0) > 0);
    CHECK(r.ws.topk_val(b, 1) > 0);
    for (index_t j = 2; j < c.k; ++j) CHECK(r.ws.topk_val(b, j) == 0.0);
  }
  r.backward();
  for (index_t n = 2; n < c.n_experts; ++n) {
    CHECK(r.g.b_gate[n] == 0.0);
    for (index_t o = 0; o < c.d_out; ++o) CHECK(r.g.C(n, o) == 0.0);
  }
}

TEST_CASE("forward and backward reject mismatched shapes naming the tensor") {
  Config c;
  c.d_in = 4; c.d_hidden = 6; c.d_out = 3; c.n_experts = 8; c.k = 2;
  Params<float> p(c);
  Workspace<float> ws;
  Tensor<float> x(5, 4), y(5, 3), bad_x(5, 3), bad_y(4, 3), empty(0, 4), y0(0, 3);
  CHECK(error_of([&] { forward<float>(p, bad_x.view(), y.view(), ws); }).find("x has shape [5, 3]") !=
        std::string::npos);
  CHECK(error_of([&] { forward<float>(p, x.view(), bad_y.view(), ws); }).find("y has shape [4, 3]") !=
        std::string::npos);
  CHECK(error_of([&] { forward<float>(p, empty.view(), y0.view(), ws); }).find("0 rows") !=
        std::string::npos);

  Grads<float> g(c);
  Tensor<float> dy(5, 3), dx(5, 4);
  CHECK(error_of([&] { backward<float>(p, x.view(), dy.view(), ws, g, dx.view()); })
            .find("call forward") != std::string::npos);
  forward<float>(p, x.view(), y.view(), ws);
  Tensor<float> bad_dy(5, 4), bad_dx(5, 5);
  CHECK(error_of([&] { backward<float>(p, x.view(), bad_dy.view(), ws, g, dx.view()); })
            .find("dy has shape [5, 4]") != std::string::npos);
  CHECK(error_of([&] { backward<float>(p, x.view(), dy.view(), ws, g, bad_dx.view()); })
            .find("dx has shape [5, 5]") != std::string::npos);
  Config other = c;
  other.n_experts = 9;
  Grads<float> g_other(other);
  CHECK(error_of([&] { backward<float>(p, x.view(), dy.view(), ws, g_other, dx.view()); })
            .find("another config") != std::string::npos);
  CHECK_NOTHROW(backward<float>(p, x.view(), dy.view(), ws, g, dx.view()));
}

TEST_CASE("borrowed parameters: forward, backward and AdamW on foreign memory equal the owning API") {
  Config c;
  c.d_in = 8; c.d_hidden = 12; c.d_out = 8; c.n_experts = 30; c.k = 4;
  c.activation = Activation::silu; c.glu = true; c.skip = true;
  Params<double> owned = random_params<double>(c, 21);
  const Tensor<double> x = random_matrix<double>(6, 8, 22), dy = random_matrix<double>(6, 8, 23);

  // "Another framework's" memory: one buffer per parameter for the weights and the gradients.
  std::map<std::string, std::vector<double>> weights, grads;
  owned.for_each([&](const char* name, const Tensor<double>& t) {
    weights[name].assign(t.data(), t.data() + t.size());
    grads[name].assign(t.size(), -1.0);
  });
  auto over = [](std::map<std::string, std::vector<double>>& m) {
    return [&m](const char* name, index_t rows, index_t cols) {
      REQUIRE(m.at(name).size() == static_cast<std::size_t>(rows * cols));
      return m.at(name).data();
    };
  };
  Params<double> pb = Params<double>::borrow(c, over(weights));
  Grads<double> gb = Grads<double>::borrow(c, over(grads));
  CHECK(!pb.E.owns_memory());
  CHECK(pb.C.data() == weights.at("W_cond").data());

  Grads<double> go(c);
  Workspace<double> wo, wb;
  Tensor<double> yo(6, 8), yb(6, 8), dxo(6, 8), dxb(6, 8);
  AdamWConfig oc;
  oc.lr = 1e-2;
  oc.warmup_steps = 0;
  AdamW<double> opt_o(owned, oc), opt_b(pb, oc);
  auto same = [](const Tensor<double>& a, const Tensor<double>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.bytes()) == 0;
  };
  for (int step = 0; step < 3; ++step) {
    forward<double>(owned, x.view(), yo.view(), wo);
    forward<double>(pb, x.view(), yb.view(), wb);
    backward<double>(owned, x.view(), dy.view(), wo, go, dxo.view());
    backward<double>(pb, x.view(), dy.view(), wb, gb, dxb.view());
    opt_o.step(owned, go, wo.ctx);
    opt_b.step(pb, gb, wb.ctx);
    CHECK(same(yo, yb));
    CHECK(same(dxo, dxb));
  }
  // Gradients and AdamW's updates landed in the foreign buffers, bit for bit.
  go.for_each([&](const char* name, const Tensor<double>& t) {
    CHECK_MESSAGE(std::memcmp(t.data(), grads.at(name).data(), t.bytes()) == 0, name);
  });
  owned.for_each([&](const char* name, const Tensor<double>& t) {
    CHECK_MESSAGE(std::memcmp(t.data(), weights.at(name).data(), t.bytes()) == 0, name);
  });
  // Borrowed memory is never reallocated, and a copy owns its own.
  CHECK(error_of([&] { pb.E.resize(9, 12); }).find("borrowed tensor of 96 values") !=
        std::string::npos);
  CHECK_NOTHROW(pb.E.resize(4, 12));
  Params<double> copy = pb;
  CHECK(copy.C.owns_memory());
  CHECK(copy.C.data() != pb.C.data());
}

TEST_CASE("gather_rows mixes the selected rows in slot order; modulate takes an empty u as 1 and an empty b_out as 0") {
  using be = backend<cpu>;
  Context<cpu> ctx;
  const index_t B = 3, N = 5, O = 4, k = 2;
  // Small integers and halves: every product and sum below is exact, whatever the rounding.
  Tensor<double> C(N, O), val(B, k), u(B, O), b(1, O), ones(B, O), zero(1, O);
  for (index_t n = 0; n < N; ++n)
    for (index_t o = 0; o < O; ++o) C(n, o) = double((n * 7 + o * 3) % 11) - 5;
  for (index_t r = 0; r < B; ++r)
    for (index_t o = 0; o < O; ++o) {
      u(r, o) = double((r + 2 * o) % 5) - 2;
      ones(r, o) = 1;
    }
  for (index_t o = 0; o < O; ++o) b(0, o) = 0.5 * double(o) - 1;
  Tensor<std::int32_t> idx(B, k);
  const std::int32_t sel[3][2] = {{4, 1}, {0, 0}, {2, 3}};
  const double coef[3][2] = {{0.5, -2}, {1.5, 0}, {0, 0}};  // zero slots add nothing
  for (index_t r = 0; r < B; ++r)
    for (index_t j = 0; j < k; ++j) {
      idx(r, j) = sel[r][j];
      val(r, j) = coef[r][j];
    }
  Tensor<double> v(B, O), v2(B, O);
  for (index_t i = 0; i < v.size(); ++i) v[i] = v2[i] = double(i % 4) - 1;  // overwritten, kept
  const Tensor<double> v0 = v2;
  be::gather_rows<double>(ctx, idx.view(), val.view(), C.view(), v.view(), false);
  be::gather_rows<double>(ctx, idx.view(), val.view(), C.view(), v2.view(), true);
  for (index_t r = 0; r < B; ++r)
    for (index_t o = 0; o < O; ++o) {
      double want = 0;
      for (index_t j = 0; j < k; ++j) want += coef[r][j] * C(sel[r][j], o);
      CHECK(v(r, o) == want);
      CHECK(v2(r, o) == v0(r, o) + want);
    }

  Tensor<double> y(B, O), y_ones(B, O), y_zero(B, O), acc(B, O);
  be::modulate<double>(ctx, u.view(), v.view(), b.view(), y.view(), false);
  for (index_t i = 0; i < acc.size(); ++i) acc[i] = double(i % 3);
  const Tensor<double> acc0 = acc;
  be::modulate<double>(ctx, u.view(), v.view(), b.view(), acc.view(), true);
  for (index_t r = 0; r < B; ++r)
    for (index_t o = 0; o < O; ++o) {
      CHECK(y(r, o) == u(r, o) * v(r, o) + b(0, o));
      CHECK(acc(r, o) == acc0(r, o) + u(r, o) * v(r, o) + b(0, o));
    }
  // u = 1 (the transcoder) and b_out = 0 (the AuxK residual) as empty views: the same bits
  // as the explicit tensors.
  be::modulate<double>(ctx, {}, v.view(), b.view(), y.view(), false);
  be::modulate<double>(ctx, ones.view(), v.view(), b.view(), y_ones.view(), false);
  CHECK(std::memcmp(y.data(), y_ones.data(), y.bytes()) == 0);
  be::modulate<double>(ctx, u.view(), v.view(), {}, y.view(), false);
  be::modulate<double>(ctx, u.view(), v.view(), zero.view(), y_zero.view(), false);
  CHECK(std::memcmp(y.data(), y_zero.data(), y.bytes()) == 0);
}

TEST_CASE("gate_topk: the k best of relu(s + b), or of s + b without relu, by (value desc, "
          "index asc), at every k") {
  using be = backend<cpu>;
  Context<cpu> ctx;
  // Negative scores, ties (+0 and -0 among them) and wide rows, so that k runs past the
  // number of blocks whose maxima filter the candidates.
  const index_t B = 3, N = 200;
  Tensor<double> s0(B, N), bias(1, N);
  for (index_t r = 0; r < B; ++r)
    for (index_t n = 0; n < N; ++n)
      s0(r, n) = double((n * 37 + r * 11) % 23) - 15 + (n % 7 == 0 ? 0.5 : 0);
  for (index_t n = 0; n < N; ++n) bias(0, n) = n % 5 == 0 ? -0.5 : 0.0;
  s0(0, 3) = -0.0;
  for (bool relu : {true, false})
    for (index_t k : {index_t(1), index_t(3), index_t(40), index_t(150), N}) {
      CAPTURE(relu);
      CAPTURE(k);
      Tensor<double> s = s0, val(B, k);
      Tensor<std::int32_t> idx(B, k);
      be::gate_topk<double>(ctx, s.view(), bias.view(), k, idx.view(), val.view(), 0, relu);
      for (index_t r = 0; r < B; ++r) {
        std::vector<std::pair<double, int>> want;  // (-value, index): ascending is the order
        for (index_t n = 0; n < N; ++n) {
          const double v = s0(r, n) + bias(0, n);
          want.push_back({-(relu ? std::max(v, 0.0) : v), int(n)});
        }
        std::sort(want.begin(), want.end());
        for (index_t j = 0; j < k; ++j) {
          CHECK(idx(r, j) == want[j].second);
          CHECK(val(r, j) == -want[j].first);
        }
      }
    }
}
