// SPDX-License-Identifier: MIT
// The AuxK auxiliary loss and the dead-unit tracking (train/aux_loss.hpp): gradients against
// finite differences (both forms, and a transcoder ranked by decoder norm), the loss against a
// direct computation, the tracker's window, the edge cases (no dead unit, k_aux above the dead
// count, one row), and the error messages.
#include <doctest/doctest.h>

#include <cstring>
#include <numeric>

#include <mxd/baselines/transcoder.hpp>
#include <mxd/train/dead_units_io.hpp>
#include <mxd/train/aux_loss.hpp>

#include "testing.hpp"

using namespace mxd;
using namespace mxd_test;
using train::AuxK;
using train::AuxKForm;
using train::AuxKWorkspace;
using train::DeadUnits;

namespace {

// A tracker of n units (window 10) in which exactly the units of `dead` are dead.
DeadUnits tracker(index_t n, const std::vector<int>& dead) {
  DeadUnits d(n, 10);
  std::vector<std::int64_t> since(static_cast<std::size_t>(n), 3);
  for (int u : dead) since[u] = 10 + u;
  d.restore(since);
  return d;
}

template <class Set>
std::vector<Tensor<double>*> tensors(Set& s) {
  std::vector<Tensor<double>*> out;
  s.for_each([&](const char*, Tensor<double>& t) { out.push_back(&t); });
  return out;
}

template <class Set>
bool same_bits(Set& a, Set& b) {
  auto ta = tensors(a), tb = tensors(b);
  bool ok = ta.size() == tb.size();
  for (std::size_t i = 0; ok && i < ta.size(); ++i)
    ok = ta[i]->size() == tb[i]->size() &&
         std::memcmp(ta[i]->data(), tb[i]->data(), ta[i]->bytes()) == 0;
  return ok;
}

// An MxD (or transcoder) forward on a random batch, whose aux loss can be re-evaluated with
// the residual e and u held at this forward's values, as auxk_backward defines them.
struct MxdCase {
  Params<double> p;
  Grads<double> g;
  Workspace<double> ws;
  Tensor<double> x, t, y;
  MxdCase(const Config& c, index_t B, std::uint64_t seed)
      : p(random_params<double>(c, seed)), g(c), x(random_matrix<double>(B, c.d_in, seed + 1)),
        t(random_matrix<double>(B, c.d_out, seed + 2)), y(B, c.d_out) {
    forward(p, x.view(), y.view(), ws);
  }
  double aux(const DeadUnits& d, const AuxK& cfg, AuxKWorkspace<double>& aw) {
    return train::auxk_backward(p, x.view(), y.view(), t.view(), ws, d, cfg, aw, g);
  }
  std::vector<std::pair<Tensor<double>*, Tensor<double>*>> gated() {  // (value, gradient)
    return {{&p.G, &g.G}, {&p.b_gate, &g.b_gate}, {&p.C, &g.C}};
  }
  index_t units() const { return p.config.n_experts; }
};

struct TranscoderCase {
  TranscoderParams<double> p, g;
  TranscoderWorkspace<double> ws;
  Tensor<double> x, t, y;
  TranscoderCase(const TranscoderConfig& c, index_t B, std::uint64_t seed)
      : p(c), g(c), x(random_matrix<double>(B, c.d_in, seed + 1)),
        t(random_matrix<double>(B, c.d_out, seed + 2)), y(B, c.d_out) {
    std::mt19937_64 rng(seed);
    fill_normal(p.W_enc, rng, 1.0 / std::sqrt(double(c.d_in)));
    fill_normal(p.b_enc, rng, 0.1, 0.3);
    fill_normal(p.W_dec, rng, 1.0);
    fill_normal(p.b_out, rng, 0.1);
    if (c.skip) fill_normal(p.W_skip, rng, 0.3);
    transcoder_forward(p, x.view(), y.view(), ws);
  }
  // The ranked transcoder's aux reads the forward's scaled encoder rows: a forward on the
  // current parameters refreshes them; e = t - y keeps this case's y.
  double aux(const DeadUnits& d, const AuxK& cfg, AuxKWorkspace<double>& aw) {
    if (p.config.rank_by_decoder_norm) {
      Tensor<double> scratch(y.rows(), y.cols());
      transcoder_forward(p, x.view(), scratch.view(), ws);
    }
    return train::auxk_backward(p, x.view(), y.view(), t.view(), ws, d, cfg, aw, g);
  }
  std::vector<std::pair<Tensor<double>*, Tensor<double>*>> gated() {
    return {{&p.W_enc, &g.W_enc}, {&p.b_enc, &g.b_enc}, {&p.W_dec, &g.W_dec}};
  }
  index_t units() const { return p.config.n_latents; }
};

// The aux selection (units and whether their coefficient is positive) of the last call.
std::vector<int> selection(const AuxKWorkspace<double>& aw) {
  std::vector<int> s;
  for (index_t i = 0; i < aw.idx.size(); ++i) {
    s.push_back(aw.idx.data()[i]);
    s.push_back(aw.val.data()[i] > 0);
  }
  return s;
}

// Central differences of the aux loss in every value of the gated tensors against its
// analytic gradient; every other gradient, and the rows of live units, must stay exactly 0.
template <class Case>
void check_gradients(Case& c, const std::vector<int>& dead_units, index_t k_aux,
                     AuxKForm form = AuxKForm::normalized) {
  const DeadUnits d = tracker(c.units(), dead_units);
  AuxK cfg{k_aux, 0.25, 10, form};
  AuxKWorkspace<double> aw;
  for (auto* t : tensors(c.g)) t->set_zero();
  const double base = c.aux(d, cfg, aw);
  REQUIRE(base > 0);
  const std::vector<int> base_sel = selection(aw);
  // Truncation ~eps^2 |L'''| ~ 1e-10, rounding ~1e-16 / eps ~ 1e-11: 1e-7 is far from both
  // and far below a missing or wrong term.
  const double eps = 1e-5, tol = 1e-7;
  int checked = 0, skipped = 0;
  std::vector<Tensor<double>> analytic;  // snapshots: every later call adds to the buffers
  for (auto vg : c.gated()) analytic.push_back(*vg.second);
  std::size_t which = 0;
  for (auto vg : c.gated()) {
    Tensor<double>* value = vg.first;
    const Tensor<double>& an = analytic[which++];
    for (index_t i = 0; i < value->size(); ++i) {
      const double keep = (*value)[i];
      (*value)[i] = keep + eps;
      const double up = c.aux(d, cfg, aw);
      const bool same_up = selection(aw) == base_sel;
      (*value)[i] = keep - eps;
      const double down = c.aux(d, cfg, aw);
      const bool same_down = selection(aw) == base_sel;
      (*value)[i] = keep;
      if (!same_up || !same_down) {
        ++skipped;  // a top-k swap or relu kink within eps: no derivative there
        continue;
      }
      const double fd = (up - down) / (2 * eps);
      CHECK(std::abs(fd - an[i]) <= tol * (1 + std::abs(an[i])));
      ++checked;
    }
    // Rows of live units: no aux gradient at all (bias and row-major rows alike).
    const index_t per_unit = value->rows() == 1 ? 1 : value->cols();
    for (index_t i = 0; i < value->size(); ++i) {
      const index_t unit = value->rows() == 1 ? i : i / per_unit;
      if (!d.dead(unit)) CHECK(an[i] == 0.0);
    }
  }
  CHECK(checked > 20);
  CHECK(skipped * 20 < checked);
}

}  // namespace

TEST_CASE("MxD: AuxK gradients match finite differences, reach only dead experts' G, b_gate, C") {
  for (auto [glu, form] : {std::pair{false, AuxKForm::normalized}, {true, AuxKForm::normalized},
                           {false, AuxKForm::saelens}, {true, AuxKForm::saelens}}) {
    Config c;
    c.d_in = 5; c.d_hidden = 7; c.d_out = 4; c.n_experts = 13; c.k = 3; c.glu = glu;
    c.activation = Activation::gelu;
    CAPTURE(glu);
    CAPTURE(int(form));
    MxdCase m(c, 6, glu ? 21 : 11);
    check_gradients(m, {1, 4, 6, 7, 11}, 2, form);
    // The dense path and b_out get nothing: e and u are constants.
    for (auto* t : {&m.g.E, &m.g.b_enc, &m.g.D, &m.g.b_out, &m.g.W_glu, &m.g.b_glu})
      for (index_t i = 0; i < t->size(); ++i) CHECK((*t)[i] == 0.0);
  }
}

TEST_CASE("TopK and skip transcoders: AuxK gradients match finite differences, dead latents only") {
  for (bool skip : {false, true})
    for (bool rank : {false, true})
      for (AuxKForm form : {AuxKForm::normalized, AuxKForm::saelens}) {
        CAPTURE(skip);
        CAPTURE(rank);
        CAPTURE(int(form));
        TranscoderCase m(TranscoderConfig{5, 5, 14, 3, skip, rank}, 7, skip ? 41 : 31);
        check_gradients(m, {0, 2, 3, 9, 12, 13}, 3, form);
        for (index_t i = 0; i < m.g.b_out.size(); ++i) CHECK(m.g.b_out[i] == 0.0);
      }
}

TEST_CASE("the loss is coef x the residual variance the top k_aux dead units leave unexplained") {
  Config c;
  c.d_in = 4; c.d_hidden = 6; c.d_out = 3; c.n_experts = 9; c.k = 2;
  c.activation = Activation::relu;
  MxdCase m(c, 5, 7);
  const std::vector<int> dead = {2, 3, 5, 8};
  const index_t k_aux = 2;
  AuxKWorkspace<double> aw;
  const double coef = 0.125;
  const double got = m.aux(tracker(9, dead), AuxK{k_aux, coef, 10}, aw);
  // Directly: scores of the dead experts, the two best per row, e_hat = u * sum a c, FVU.
  const index_t B = 5, O = 3;
  std::vector<double> e(B * O), eh(B * O, 0.0), mean(O, 0.0);
  for (index_t b = 0; b < B; ++b) {
    std::vector<std::pair<double, int>> s;
    for (int n : dead) {
      double v = m.p.b_gate[n];
      for (index_t i = 0; i < c.d_in; ++i) v += m.x(b, i) * m.p.G(n, i);
      s.push_back({-std::max(v, 0.0), n});
    }
    std::sort(s.begin(), s.end());
    for (index_t o = 0; o < O; ++o) {
      for (index_t j = 0; j < k_aux; ++j) eh[b * O + o] += -s[j].first * m.p.C(s[j].second, o);
      eh[b * O + o] *= m.ws.u(b, o);
      e[b * O + o] = m.t(b, o) - m.y(b, o);
      mean[o] += e[b * O + o] / double(B);
    }
  }
  double err = 0, var = 0;
  for (index_t b = 0; b < B; ++b)
    for (index_t o = 0; o < O; ++o) {
      err += (e[b * O + o] - eh[b * O + o]) * (e[b * O + o] - eh[b * O + o]);
      var += (e[b * O + o] - mean[o]) * (e[b * O + o] - mean[o]);
    }
  CHECK(got == doctest::Approx(coef * err / var).epsilon(1e-12));
  CHECK(aw.n_dead == 4);
}

TEST_CASE("SAELens form: raw pre-activations of the best dead latents, min(dead / k_aux, 1) x "
          "the rows' mean squared error, and negative scores still get a gradient") {
  for (bool rank : {false, true}) {
    CAPTURE(rank);
    const index_t I = 4, O = 4, M = 11, B = 5;
    TranscoderCase m(TranscoderConfig{I, O, M, 2, false, rank}, B, 17);
    // Dead latents 1 and 6 score below 0 on every row: relu would give them no gradient.
    const std::vector<int> dead = {1, 3, 6, 8, 9};
    for (int n : {1, 6}) m.p.b_enc[n] = -20;
    for (index_t o = 0; o < O; ++o) m.p.W_dec(9, o) *= 3;  // ranking by norm favours latent 9
    transcoder_forward(m.p, m.x.view(), m.y.view(), m.ws);
    for (index_t k_aux : {index_t(2), index_t(5), index_t(8)}) {
      CAPTURE(k_aux);
      AuxKWorkspace<double> aw;
      for (auto* t : tensors(m.g)) t->set_zero();
      const double coef = 0.75;
      const double got = m.aux(tracker(M, dead), AuxK{k_aux, coef, 10, AuxKForm::saelens}, aw);
      // Directly: per row the min(k_aux, 5) dead latents of largest pre (x |W_dec| when ranked),
      // e_hat = sum pre W_dec, then coef min(5 / k_aux, 1) sum |e - e_hat|^2 / B.
      double err = 0;
      for (index_t b = 0; b < B; ++b) {
        std::vector<std::pair<double, int>> s;
        for (int n : dead) {
          double pre = m.p.b_enc[n], norm = 0;
          for (index_t i = 0; i < I; ++i) pre += m.x(b, i) * m.p.W_enc(n, i);
          for (index_t o = 0; o < O; ++o) norm += m.p.W_dec(n, o) * m.p.W_dec(n, o);
          s.push_back({-(rank ? pre * std::sqrt(norm) : pre), n});
        }
        std::sort(s.begin(), s.end());
        for (index_t o = 0; o < O; ++o) {
          double eh = 0;
          for (index_t j = 0; j < std::min<index_t>(k_aux, 5); ++j) {
            const int n = s[j].second;
            double pre = m.p.b_enc[n];
            for (index_t i = 0; i < I; ++i) pre += m.x(b, i) * m.p.W_enc(n, i);
            eh += pre * m.p.W_dec(n, o);
          }
          const double f = m.t(b, o) - m.y(b, o) - eh;
          err += f * f;
        }
      }
      const double want = coef * std::min(5.0 / double(k_aux), 1.0) * err / double(B);
      CHECK(got == doctest::Approx(want).epsilon(1e-12));
      if (k_aux == 5) {  // every dead latent serves every row: 1 and 6 learn from below 0
        for (int n : {1, 6}) {
          CHECK(m.g.b_enc[n] != 0.0);
          CHECK(m.g.W_dec(n, 0) != 0.0);
        }
        AuxKWorkspace<double> wn;
        for (auto* t : tensors(m.g)) t->set_zero();
        m.aux(tracker(M, dead), AuxK{k_aux, coef, 10}, wn);
        for (int n : {1, 6}) CHECK(m.g.b_enc[n] == 0.0);  // the normalized form: relu's 0
      }
    }
  }
}

TEST_CASE("DeadUnits: dead once `window` tokens pass without a positive selection") {
  DeadUnits d(4, 5);
  CHECK(d.count() == 0);  // nothing is dead before a window of tokens has been seen
  // Batch of 3 rows: unit 0 in row 2 (last), unit 1 in row 0, unit 2 only with value 0.
  Tensor<std::int32_t> idx(3, 1);
  Tensor<double> val(3, 1);
  idx[0] = 1; val[0] = 0.5;
  idx[1] = 2; val[1] = 0.0;
  idx[2] = 0; val[2] = 2.0;
  d.record(idx.view(), val.view());
  CHECK(d.tokens_since() == std::vector<std::int64_t>{0, 2, 3, 3});
  CHECK(d.count() == 0);
  d.record(idx.view(), val.view());  // units 2 and 3 reach 6 tokens >= window 5
  CHECK(d.tokens_since() == std::vector<std::int64_t>{0, 2, 6, 6});
  CHECK(d.dead(2));
  CHECK(d.dead(3));
  CHECK_FALSE(d.dead(1));
  std::vector<std::int32_t> list;
  d.list(list);
  CHECK(list == std::vector<std::int32_t>{2, 3});
  // Selected again (a positive value): alive at once, counting from its last row.
  val[1] = 0.1;
  d.record(idx.view(), val.view());
  CHECK(d.tokens_since() == std::vector<std::int64_t>{0, 2, 1, 9});
  CHECK(d.count() == 1);
}

TEST_CASE("k_aux above the dead count uses every dead unit, bit for bit as k_aux = dead count") {
  Config c;
  c.d_in = 5; c.d_hidden = 7; c.d_out = 4; c.n_experts = 13; c.k = 3;
  MxdCase a(c, 6, 3), b(c, 6, 3);
  const DeadUnits d = tracker(13, {2, 9, 10});
  AuxKWorkspace<double> wa, wb;
  const double la = a.aux(d, AuxK{3, 0.5, 10}, wa), lb = b.aux(d, AuxK{100, 0.5, 10}, wb);
  CHECK(la > 0);
  CHECK(la == lb);
  CHECK(wb.idx.cols() == 3);
  CHECK(same_bits(a.g, b.g));
}

TEST_CASE("no dead unit, AuxK off, or a residual without variance: loss 0, gradients untouched") {
  Config c;
  c.d_in = 5; c.d_hidden = 7; c.d_out = 4; c.n_experts = 13; c.k = 3;
  MxdCase m(c, 6, 5);
  std::mt19937_64 rng(9);
  for (auto* t : tensors(m.g)) fill_normal(*t, rng, 1.0);
  const Grads<double> before = m.g;
  AuxKWorkspace<double> aw;
  CHECK(m.aux(tracker(13, {}), AuxK{4, 0.5, 10}, aw) == 0.0);
  CHECK(m.aux(tracker(13, {1, 2, 3}), AuxK{0, 0.5, 10}, aw) == 0.0);
  Grads<double> after = m.g, ref = before;
  CHECK(same_bits(after, ref));
  // One row: e - mean(e) = 0, so the normalised loss is undefined; it is taken as 0.
  MxdCase one(c, 1, 5);
  for (auto* t : tensors(one.g)) fill_normal(*t, rng, 1.0);
  Grads<double> one_before = one.g;
  CHECK(one.aux(tracker(13, {1, 2, 3}), AuxK{2, 0.5, 10}, aw) == 0.0);
  CHECK(same_bits(one.g, one_before));
}

TEST_CASE("AuxK adds to what the gradient buffers hold (GradMode::Accumulate)") {
  Config c;
  c.d_in = 5; c.d_hidden = 7; c.d_out = 4; c.n_experts = 13; c.k = 3;
  MxdCase a(c, 6, 8), b(c, 6, 8);
  const DeadUnits d = tracker(13, {0, 5, 6, 12});
  std::mt19937_64 rng(4);
  for (auto* t : tensors(b.g)) fill_normal(*t, rng, 1.0);
  const Grads<double> held = b.g;
  AuxKWorkspace<double> wa, wb;
  a.aux(d, AuxK{2, 0.5, 10}, wa);  // from zero buffers: the aux gradient alone
  b.aux(d, AuxK{2, 0.5, 10}, wb);
  auto ga = tensors(a.g), gb = tensors(b.g);
  auto gh = tensors(const_cast<Grads<double>&>(held));
  for (std::size_t n = 0; n < ga.size(); ++n)
    for (index_t i = 0; i < ga[n]->size(); ++i)
      CHECK((*gb[n])[i] == doctest::Approx((*gh[n])[i] + (*ga[n])[i]).epsilon(1e-14));
}

TEST_CASE("AuxK gives the same bits for any row tile and thread count") {
  Config c;
  c.d_in = 6; c.d_hidden = 8; c.d_out = 5; c.n_experts = 40; c.k = 3;
  const DeadUnits d = tracker(40, {1, 3, 4, 8, 15, 16, 23, 29, 30, 31, 39});
  MxdCase ref(c, 33, 12);
  AuxKWorkspace<double> wr;
  const double l = ref.aux(d, AuxK{4, 0.5, 10}, wr);
  // 11 dead units of I = 6: row tiles of 1, 5, 6 and all 33 rows; gate rows gathered one at a
  // time, in chunks of 9 (per row tile), and all at once.
  for (index_t tile : {index_t(1), index_t(11 * 5), index_t(66), index_t(11 * 33)})
    for (int threads : {1, 2, 3}) {
      CAPTURE(tile);
      CAPTURE(threads);
      MxdCase m(c, 33, 12);
      m.ws.ctx.threads = threads;
      AuxKWorkspace<double> aw;
      aw.tile_elements = tile;
      CHECK(m.aux(d, AuxK{4, 0.5, 10}, aw) == l);
      CHECK(same_bits(m.g, ref.g));
    }
}

TEST_CASE("AuxK and DeadUnits reject bad arguments naming the value") {
  CHECK(error_of([] { AuxK{-1}.validate(); }) == "AuxK.k = -1 must be >= 0 (0: off)");
  CHECK(error_of([] { AuxK{4, std::nan("")}.validate(); }) ==
        "AuxK.coef = nan must be finite and > 0");
  CHECK(error_of([] { AuxK{4, 0.0}.validate(); }) == "AuxK.coef = 0 must be finite and > 0");
  CHECK(error_of([] { AuxK{4, 0.1, 0}.validate(); }) == "AuxK.dead_window = 0 must be positive");
  CHECK(error_of([] { DeadUnits(0, 5); }) == "DeadUnits: n_units = 0 must be in [1, 2^31)");
  CHECK(error_of([] { DeadUnits(3, -2); }) == "DeadUnits: window = -2 must be positive");
  DeadUnits d(3, 5);
  Tensor<std::int32_t> idx(1, 2);
  Tensor<float> val(1, 2);
  idx[1] = 7;
  CHECK(error_of([&] { d.record(idx.view(), val.view()); }) ==
        "DeadUnits::record: idx(0, 1) = 7 is not a unit of 3");
  CHECK(error_of([&] { d.restore({1, 2}); }) == "DeadUnits::restore: 2 counts for 3 units");
  CHECK(error_of([&] { d.restore({1, -2, 0}); }) ==
        "DeadUnits::restore: unit 1 has the negative count -2");

  Config c;
  c.d_in = 5; c.d_hidden = 7; c.d_out = 4; c.n_experts = 13; c.k = 3;
  MxdCase m(c, 6, 5);
  AuxKWorkspace<double> aw;
  CHECK(error_of([&] { m.aux(tracker(12, {1}), AuxK{2}, aw); }) ==
        "auxk_backward: the dead-unit tracker has 12 units but the model has 13");
  CHECK(error_of([&] { m.aux(tracker(13, {1}), AuxK{2, -1.0}, aw); }) ==
        "AuxK.coef = -1 must be finite and > 0");
  Tensor<double> short_t(6, 3);
  CHECK(error_of([&] {
          train::auxk_backward(m.p, m.x.view(), m.y.view(), short_t.view(), m.ws, tracker(13, {1}),
                               AuxK{2}, aw, m.g);
        }) == "auxk_backward: target has shape [6, 3], expected [6, 4]");
  Tensor<double> x5 = random_matrix<double>(5, 5, 1);
  CHECK(error_of([&] {
          train::auxk_backward(m.p, x5.view(), m.y.view(), m.t.view(), m.ws, tracker(13, {1}),
                               AuxK{2}, aw, m.g);
        }) == "auxk_backward: workspace holds a forward of 6 rows but x has 5 (call forward on "
              "this batch first)");
}

TEST_CASE("the dead-unit state round-trips through its file; another unit count is refused") {
  DeadUnits d(5, 7);
  d.restore({0, 9, 3, 70000000000LL, 7});
  const std::string path = scratch_path("dead.safetensors").string();
  train::save_dead_units(path, d);
  DeadUnits back(5, 7);
  train::load_dead_units(path, back);
  CHECK(back.tokens_since() == d.tokens_since());
  DeadUnits other(6, 7);
  CHECK(error_of([&] { train::load_dead_units(path, other); }) ==
        path + ": tokens_since has shape [5] but the model has 6 units");
}
