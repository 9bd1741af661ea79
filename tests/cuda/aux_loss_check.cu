// SPDX-License-Identifier: MIT
// The AuxK loss (train/aux_loss.cuh) on backend<cuda>, in float64: every gradient against
// central finite differences in both forms, live units receiving exactly zero, the loss against
// a direct host computation, no dead unit leaving the loss 0 and the gradients untouched, for
// MxD and a TopK transcoder; and a transcoder ranked by decoder norm against the CPU. A program
// of its own (not the doctest GPU suite) because it needs the device's float64 layer and the
// aux workspace in one nvcc translation unit. Exits 77 (ctest: skipped) where no CUDA device
// is visible; a broken driver is a failure.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <mxd/backend/cpu.hpp>  // the ranked transcoder's check runs the CPU beside the GPU
#include <mxd/cuda.cuh>
#include <mxd/baselines/transcoder.hpp>
#include <mxd/train/aux_loss.cuh>

using namespace mxd;
using Dev = mxd::cuda;

using train::AuxK;
using train::AuxKForm;
using train::AuxKWorkspace;
using train::DeadUnits;

static int failures = 0, checks = 0;
#define EXPECT(c, ...)                                  \
  do {                                                  \
    ++checks;                                           \
    if (!(c)) {                                         \
      ++failures;                                       \
      std::printf("FAIL line %d: ", __LINE__);          \
      std::printf(__VA_ARGS__);                         \
      std::printf("\n");                                \
    }                                                   \
  } while (0)

static void fill(Tensor<double>& t, std::mt19937_64& rng, double s, double shift = 0) {
  std::normal_distribution<double> d(0, 1);
  for (index_t i = 0; i < t.size(); ++i) t[i] = shift + s * d(rng);
}

static DeadUnits tracker(index_t n, const std::vector<int>& dead) {
  DeadUnits d(n, 10);
  std::vector<std::int64_t> since(n, 3);
  for (int u : dead) since[u] = 10 + u;
  d.restore(since);
  return d;
}

template <class DevSet, class HostSet, class WS, class Fwd>
static void fd_check(const char* what, HostSet& hp, const std::vector<Tensor<double>*>& gated,
                     const std::vector<const char*>& names, index_t N, const DeadUnits& d,
                     const Tensor<double>& x, const Tensor<double>& t, AuxKForm form, Fwd&& fwd) {
  // Device forward once: pred and u stay at these values (the aux loss's constants).
  DevSet p = to_device(hp);
  Tensor<double, mxd::cuda> xd = to_device(x), td = to_device(t), yd(x.rows(), t.cols());
  WS ws;
  fwd(p, xd, yd, ws);
  AuxK cfg{3, 0.25, 10, form};
  AuxKWorkspace<double, mxd::cuda> aw;
  DevSet g = to_device(hp);
  g.for_each([](const char*, Tensor<double, mxd::cuda>& z) { z.set_zero(); });
  const double base = train::auxk_backward(p, xd.view(), yd.view(), td.view(), ws, d, cfg, aw, g);
  EXPECT(base > 0, "%s: base loss %g", what, base);
  HostSet gh = to_host(g);
  std::vector<Tensor<double>*> ggated;
  gh.for_each([&](const char* n, Tensor<double>& z) {
    for (auto* nm : names)
      if (std::string(n) == nm) ggated.push_back(&z);
  });
  const double eps = 1e-5, tol = 1e-7;
  int checked = 0;
  double worst = 0;
  for (std::size_t q = 0; q < gated.size(); ++q) {
    Tensor<double>& v = *gated[q];
    for (index_t i = 0; i < v.size(); ++i) {
      const double keep = v[i];
      auto eval = [&](double val) {
        v[i] = val;
        DevSet pp = to_device(hp);
        DevSet gg = to_device(hp);
        return train::auxk_backward(pp, xd.view(), yd.view(), td.view(), ws, d, cfg, aw, gg);
      };
      const double up = eval(keep + eps), down = eval(keep - eps);
      v[i] = keep;
      const double fd = (up - down) / (2 * eps), an = (*ggated[q])[i];
      const double err = std::abs(fd - an) / (1 + std::abs(an));
      worst = std::max(worst, err);
      ++checked;
      // Live units' rows must receive nothing.
      const index_t unit = v.rows() == 1 ? i : i / v.cols();
      if (!d.dead(unit)) EXPECT(an == 0.0, "%s: live unit %lld has gradient %g", what, (long long)unit, an);
    }
  }
  // Selection swaps within eps are possible but rare at these sizes: report the worst error.
  std::printf("%s: loss %.6g, %d finite differences, worst relative error %.2e\n", what, base,
              checked, worst);
  EXPECT(worst < tol, "%s: worst FD error %g", what, worst);
  (void)N;
}

int main() {
  // The same verdict as the GPU suite's: none installed or visible skips, a broken driver fails.
  int devices = 0;
  try {
    devices = cuda_device_count();
  } catch (const Error& e) {
    std::printf("FAILED: %s\n", e.what());
    return 1;
  }
  if (devices == 0) {
    std::printf("no CUDA device is visible\n");
    return 77;
  }
  std::mt19937_64 rng(5);
  // MxD.
  Config c;
  c.d_in = 5; c.d_hidden = 7; c.d_out = 4; c.n_experts = 13; c.k = 3;
  c.activation = Activation::gelu;
  Params<double> hp(c);
  fill(hp.E, rng, 0.45); fill(hp.b_enc, rng, 0.1); fill(hp.D, rng, 0.38);
  fill(hp.G, rng, 0.45); fill(hp.b_gate, rng, 0.1, 0.3); fill(hp.C, rng, 1.0); fill(hp.b_out, rng, 0.1);
  Tensor<double> x(6, 5), t(6, 4);
  fill(x, rng, 1.0);
  fill(t, rng, 1.0);
  const DeadUnits d = tracker(13, {1, 4, 6, 7, 11});
  for (AuxKForm form : {AuxKForm::normalized, AuxKForm::saelens})
    fd_check<Params<double, mxd::cuda>, Params<double>, Workspace<double, mxd::cuda>>(
        form == AuxKForm::saelens ? "mxd (cuda, f64, saelens form)" : "mxd (cuda, f64)", hp,
        {&hp.G, &hp.b_gate, &hp.C}, {"gate", "gate_bias", "W_cond"}, 13, d, x, t, form,
        [](auto& p, auto& xd, auto& yd, auto& ws) { forward(p, xd.view(), yd.view(), ws); });

  // The loss against a direct host computation (host copies of pred and u).
  {
    Params<double, mxd::cuda> p = to_device(hp);
    Tensor<double, mxd::cuda> xd = to_device(x), td = to_device(t), yd(6, 4);
    Workspace<double, mxd::cuda> ws;
    forward(p, xd.view(), yd.view(), ws);
    Grads<double, mxd::cuda> g(c);
    AuxKWorkspace<double, mxd::cuda> aw;
    const double got = train::auxk_backward(p, xd.view(), yd.view(), td.view(), ws, d, AuxK{2, 0.125, 10}, aw, g);
    Tensor<double> y = to_host(yd), u = to_host(ws.u);
    std::vector<int> dead = {1, 4, 6, 7, 11};
    double err = 0, var = 0;
    std::vector<double> e(24), eh(24, 0), mean(4, 0);
    for (int b = 0; b < 6; ++b) {
      std::vector<std::pair<double, int>> s;
      for (int nn : dead) {
        double v = hp.b_gate[nn];
        for (int i = 0; i < 5; ++i) v += x(b, i) * hp.G(nn, i);
        s.push_back({-std::max(v, 0.0), nn});
      }
      std::sort(s.begin(), s.end());
      for (int o = 0; o < 4; ++o) {
        for (int j = 0; j < 2; ++j) eh[b * 4 + o] += -s[j].first * hp.C(s[j].second, o);
        eh[b * 4 + o] *= u(b, o);
        e[b * 4 + o] = t(b, o) - y(b, o);
        mean[o] += e[b * 4 + o] / 6;
      }
    }
    for (int i = 0; i < 24; ++i) {
      err += (e[i] - eh[i]) * (e[i] - eh[i]);
      var += (e[i] - mean[i % 4]) * (e[i] - mean[i % 4]);
    }
    const double want = 0.125 * err / var;
    std::printf("mxd (cuda): loss %.15g, host direct %.15g\n", got, want);
    EXPECT(std::abs(got - want) <= 1e-12 * want, "loss %g vs %g", got, want);
    // No dead unit: 0 and the gradients untouched.
    Grads<double> before = to_host(g);
    const double none = train::auxk_backward(p, xd.view(), yd.view(), td.view(), ws, tracker(13, {}), AuxK{2}, aw, g);
    Grads<double> after = to_host(g);
    bool same = true;
    std::vector<Tensor<double>*> ta, tb;
    before.for_each([&](const char*, Tensor<double>& z) { ta.push_back(&z); });
    after.for_each([&](const char*, Tensor<double>& z) { tb.push_back(&z); });
    for (std::size_t q = 0; q < ta.size(); ++q)
      same = same && std::memcmp(ta[q]->data(), tb[q]->data(), ta[q]->bytes()) == 0;
    EXPECT(none == 0.0 && same, "no dead unit: loss %g, grads same %d", none, int(same));
  }

  // TopK transcoder.
  TranscoderConfig tc{5, 5, 14, 3, false};
  TranscoderParams<double> tp(tc);
  fill(tp.W_enc, rng, 0.45); fill(tp.b_enc, rng, 0.1, 0.3); fill(tp.W_dec, rng, 1.0); fill(tp.b_out, rng, 0.1);
  Tensor<double> xt(7, 5), tt(7, 5);
  fill(xt, rng, 1.0);
  fill(tt, rng, 1.0);
  for (AuxKForm form : {AuxKForm::normalized, AuxKForm::saelens})
    fd_check<TranscoderParams<double, mxd::cuda>, TranscoderParams<double>, TranscoderWorkspace<double, mxd::cuda>>(
        form == AuxKForm::saelens ? "topk_transcoder (cuda, f64, saelens form)"
                                  : "topk_transcoder (cuda, f64)",
        tp, {&tp.W_enc, &tp.b_enc, &tp.W_dec}, {"W_enc", "b_enc", "W_dec"},
        14, tracker(14, {0, 2, 3, 9, 12, 13}), xt, tt, form,
        [](auto& p, auto& xd, auto& yd, auto& ws) { transcoder_forward(p, xd.view(), yd.view(), ws); });

  // Ranked by decoder norm, SAELens form (negative pre-activations selected): GPU against CPU.
  {
    tp.config.rank_by_decoder_norm = true;
    for (int n : {2, 9}) tp.b_enc[n] = -20;  // dead latents scoring below 0 on every row
    const DeadUnits dt = tracker(14, {0, 2, 3, 9, 12, 13});
    const AuxK cfg{6, 0.5, 10, AuxKForm::saelens};  // all six dead selected, both below 0 too
    TranscoderParams<double> hg(tp.config);
    Tensor<double> hy(7, 5);
    TranscoderWorkspace<double> hws;
    AuxKWorkspace<double> haw;
    transcoder_forward(tp, xt.view(), hy.view(), hws);
    const double want = train::auxk_backward(tp, xt.view(), hy.view(), tt.view(), hws, dt, cfg, haw, hg);
    TranscoderParams<double, mxd::cuda> p = to_device(tp), g = to_device(hg);
    g.for_each([](const char*, Tensor<double, mxd::cuda>& z) { z.set_zero(); });
    Tensor<double, mxd::cuda> xd = to_device(xt), td = to_device(tt), yd(7, 5);
    TranscoderWorkspace<double, mxd::cuda> ws;
    AuxKWorkspace<double, mxd::cuda> aw;
    transcoder_forward(p, xd.view(), yd.view(), ws);
    const double got = train::auxk_backward(p, xd.view(), yd.view(), td.view(), ws, dt, cfg, aw, g);
    TranscoderParams<double> gh = to_host(g);
    double worst = 0;
    for (auto [a, b] : {std::pair{&gh.W_enc, &hg.W_enc}, {&gh.b_enc, &hg.b_enc}, {&gh.W_dec, &hg.W_dec}})
      for (index_t i = 0; i < a->size(); ++i)
        worst = std::max(worst, std::abs((*a)[i] - (*b)[i]) / (1 + std::abs((*b)[i])));
    std::printf("ranked transcoder, saelens form (cuda): loss %.15g, cpu %.15g, worst gradient "
                "difference %.2e\n", got, want, worst);
    EXPECT(want > 0 && std::abs(got - want) <= 1e-12 * want, "loss %g vs cpu %g", got, want);
    EXPECT(worst <= 1e-12, "gradients differ from the cpu's by %g", worst);
    EXPECT(hg.b_enc[2] != 0.0 && hg.b_enc[9] != 0.0, "latents below 0 got no gradient");
  }

  std::printf("%d checks, %d failures\n", checks, failures);
  return failures ? 1 : 0;
}
