// SPDX-License-Identifier: MIT
// Training pieces: AdamW against torch, warm-up, norm_dec, the authors' initialisation, the
// parameter-matched expert count, the transcoder baselines, train::step, checkpoints and data
// sources.
#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <mxd/baselines/transcoder.hpp>
#include <mxd/init.hpp>
#include <mxd/io/checkpoint.hpp>
#include <mxd/train/data.hpp>
#include <mxd/train/step.hpp>

#include "testing.hpp"

using namespace mxd;
using namespace mxd_test;
namespace fs = std::filesystem;

namespace {

// The smallest parameter set AdamW accepts: one [5, 7] tensor.
struct OneTensor {
  int config = 0;
  Tensor<double> w;
  explicit OneTensor(int) : w(5, 7) {}
  template <class F>
  void for_each(F&& f) { f("w", w); }
  template <class F>
  void for_each(F&& f) const { f("w", w); }
};

template <class T>
bool same_bits(const Tensor<T>& a, const Tensor<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.bytes()) == 0;
}

// Every tensor of two parameter sets of float values holds the same bits.
template <class Set>
bool same_bits_all(const Set& a, const Set& b) {
  std::vector<const Tensor<float>*> pa, pb;
  a.for_each([&](const char*, const Tensor<float>& t) { pa.push_back(&t); });
  b.for_each([&](const char*, const Tensor<float>& t) { pb.push_back(&t); });
  bool ok = pa.size() == pb.size();
  for (std::size_t i = 0; ok && i < pa.size(); ++i) ok = same_bits(*pa[i], *pb[i]);
  return ok;
}

Config tiny_config() {
  Config c;
  c.d_in = 8; c.d_hidden = 32; c.d_out = 8; c.n_experts = 64; c.k = 4;
  c.activation = Activation::gelu;
  return c;
}

// An MxD of tiny_config() initialised with `seed`, in training with AdamW at lr and warm-up.
train::Trainer<Params<float>> tiny_trainer(std::uint64_t seed, double lr, long long warmup) {
  Params<float> p(tiny_config());
  init_params(p, seed);
  AdamWConfig oc;
  oc.lr = lr;
  oc.warmup_steps = warmup;
  return train::Trainer<Params<float>>(std::move(p), oc);
}

// `steps` training steps (train::step, as `mxd train` runs them) of an MxD on the teacher
// from step `from`, in batches of 64.
void train_steps(train::Trainer<Params<float>>& m, train::Teacher<float>& teacher, int from,
                 int steps, std::vector<double>* losses = nullptr) {
  Tensor<float> x, y;
  for (int s = from; s < from + steps; ++s) {
    teacher.train_batch(static_cast<std::uint64_t>(s), 64, x, y);
    const double l = train::step(m, x.view(), y.view());
    if (losses) losses->push_back(l);
  }
}

}  // namespace

TEST_CASE("three AdamW steps equal torch.optim.AdamW to rounding") {
  io::SafetensorsReader f(data_path("adamw/adamw_golden.safetensors"));
  auto meta = [&](const char* k) { return std::stod(f.metadata().at(k)); };
  AdamWConfig c;
  c.lr = meta("lr");
  c.beta1 = meta("beta1");
  c.beta2 = meta("beta2");
  c.eps = meta("eps");
  c.weight_decay = meta("weight_decay");
  c.warmup_steps = 0;  // torch.optim.AdamW has no schedule
  OneTensor p(0), g(0);
  const auto p0 = f.read_all<double>("param.0", {5, 7});
  std::copy(p0.begin(), p0.end(), p.w.data());
  AdamW<double, cpu, OneTensor> opt(p, c);
  Context<cpu> ctx;
  for (int step = 1; step <= 3; ++step) {
    CAPTURE(step);
    const auto gs = f.read_all<double>("grad." + std::to_string(step));
    std::copy(gs.begin(), gs.end(), g.w.data());
    opt.step(p, g, ctx);
    const auto want = f.read_all<double>("param." + std::to_string(step));
    // torch runs the same double operations; 1e-14 allows for its fused lerp and sqrt order.
    CHECK(rel_error(p.w.data(), want.data(), want.size()) <= 1e-14);
  }
  CHECK(opt.t == 3);
}

TEST_CASE_TEMPLATE("AdamW's update is the same bits wherever the buffers start", T, float, double) {
  // Parameters borrowed from another framework start at any address. Eigen's packet sqrt (an
  // approximation under its default EIGEN_FAST_MATH: float, and double with AVX-512) once
  // took some elements and its exact scalar sqrt the others, by address (this failed for
  // float before): every start from 0 to 15 elements past a 64-byte boundary.
  constexpr index_t n = 1000, pad = 16;
  const AdamWStep s{1e-2, 0.9, 0.999, 1e-8, 0.01, 1 - 0.9 * 0.9, std::sqrt(1 - 0.999 * 0.999)};
  std::vector<T> want;
  Context<cpu> ctx;
  for (index_t off = 0; off < pad; ++off) {
    std::vector<T> bp(n + 2 * pad), bg(n + 2 * pad), bm(n + 2 * pad), bv(n + 2 * pad);
    auto at = [](std::vector<T>& b, index_t o) {  // o elements past b's first 64-byte boundary
      const auto a = reinterpret_cast<std::uintptr_t>(b.data());
      return b.data() + (64 - a % 64) % 64 / sizeof(T) + o;
    };
    // The parameters and gradients borrowed, the moments the optimizer's own (aligned).
    T *p = at(bp, off), *g = at(bg, off), *m = at(bm, 0), *v = at(bv, 0);
    for (index_t i = 0; i < n; ++i) {
      p[i] = T(std::sin(0.37 * double(i)));
      g[i] = T(0.1 * std::cos(1.3 * double(i)));
      m[i] = T(0.01);
      v[i] = T(0.02);
    }
    for (int step = 0; step < 3; ++step)
      backend<cpu>::adamw_update<T>(ctx, View<T, cpu>(p, 1, n), InView<T, cpu>(g, 1, n),
                                    View<T, cpu>(m, 1, n), View<T, cpu>(v, 1, n), s);
    std::vector<T> got(p, p + n);
    if (off == 0) want = got;
    CAPTURE(off);
    CHECK(std::memcmp(got.data(), want.data(), n * sizeof(T)) == 0);
  }
}

TEST_CASE("the learning rate warms up linearly then stays constant") {
  AdamWConfig c;
  c.lr = 4e-4;
  c.warmup_steps = 5000;
  CHECK(c.learning_rate(1) == doctest::Approx(4e-4 / 5000));
  CHECK(c.learning_rate(2500) == doctest::Approx(2e-4));
  CHECK(c.learning_rate(5000) == 4e-4);
  CHECK(c.learning_rate(123456) == 4e-4);
  c.warmup_steps = 0;
  CHECK(c.learning_rate(1) == 4e-4);
}

TEST_CASE("AdamWConfig rejects NaN and out-of-range hyper-parameters by name") {
  auto bad = [](auto set) { AdamWConfig c; set(c); return error_of([&] { c.validate(); }); };
  CHECK(bad([](AdamWConfig& c) { c.lr = std::nan(""); }).find("AdamWConfig.lr = nan") != std::string::npos);
  CHECK(bad([](AdamWConfig& c) { c.beta1 = 1.0; }).find("AdamWConfig.beta1 = 1") != std::string::npos);
  CHECK(bad([](AdamWConfig& c) { c.beta2 = -0.5; }).find("AdamWConfig.beta2") != std::string::npos);
  CHECK(bad([](AdamWConfig& c) { c.eps = 0; }).find("AdamWConfig.eps") != std::string::npos);
  CHECK(bad([](AdamWConfig& c) { c.weight_decay = -1; }).find("weight_decay") != std::string::npos);
  CHECK(bad([](AdamWConfig& c) { c.warmup_steps = -1; }).find("warmup_steps") != std::string::npos);
}

TEST_CASE("the authors' initialisation: D and biases zero and encoder weights within the nn.Linear bound") {
  Config c = tiny_config();
  c.glu = true;
  c.skip = true;
  Params<double> p(c);
  init_params(p, 3);
  const double bound = 1 / std::sqrt(8.0);
  for (index_t i = 0; i < p.D.size(); ++i) CHECK(p.D[i] == 0.0);
  for (index_t i = 0; i < p.W_skip.size(); ++i) CHECK(p.W_skip[i] == 0.0);
  for (index_t i = 0; i < p.b_gate.size(); ++i) CHECK(p.b_gate[i] == 0.0);
  double e_max = 0, g_max = 0;
  for (index_t i = 0; i < p.E.size(); ++i) e_max = std::max(e_max, std::abs(p.E[i]));
  for (index_t i = 0; i < p.G.size(); ++i) g_max = std::max(g_max, std::abs(p.G[i]));
  CHECK(e_max <= bound);
  CHECK(e_max > 0.8 * bound);  // really drawn over the whole range
  CHECK(g_max <= bound);
  for (index_t n = 0; n < c.n_experts; ++n) {
    double sq = 0;
    for (index_t o = 0; o < c.d_out; ++o) sq += p.C(n, o) * p.C(n, o);
    CHECK(std::sqrt(sq) == doctest::Approx(1.0).epsilon(1e-14));
  }
}

// N = floor((P_tc - P_base) / (I + O + 1)), P_tc = I M + M O + M + O with M = m I latents,
// P_base = the MxD's parameters other than G, b_gate and C (which hold I + 1 + O per expert).
TEST_CASE("parameter-matched expert counts follow N = floor((P_tc - P_base) / (I + O + 1)) under both conventions") {
  CHECK(matched_experts(768, 3072, 768, 32) == 21504);
  CHECK(matched_experts(768, 3072, 768, 32, false, false, MatchConvention::authors) == 21490);
  CHECK(matched_experts(1024, 4096, 1024, 32, false, false, MatchConvention::authors) == 28658);
  CHECK(matched_experts(2048, 8192, 2048, 32, false, false, MatchConvention::authors) == 57330);
  Config c;
  c.d_in = 64; c.d_hidden = 256; c.d_out = 64; c.k = 32;
  c.n_experts = matched_experts(64, 256, 64, 32);
  const TranscoderConfig t{64, 64, 32 * 64, 32, false};
  CHECK(c.n_params() <= t.n_params());
  CHECK(t.n_params() - c.n_params() < 64 + 64 + 1);  // within one expert of equal
  CHECK(error_of([] { matched_experts(64, 100000, 64, 1); }).find("fewer than") != std::string::npos);
}

TEST_CASE("norm_dec keeps every expert vector at unit norm through training") {
  const Config c = tiny_config();
  train::Trainer<Params<float>> m = tiny_trainer(4, 1e-2, 0);
  train::Teacher<float> teacher(8, 32, 8, 5, 0);
  train_steps(m, teacher, 0, 5);
  const Params<float>& p = m.p;
  for (index_t n = 0; n < c.n_experts; ++n) {
    double sq = 0;
    for (index_t o = 0; o < c.d_out; ++o) sq += double(p.C(n, o)) * p.C(n, o);
    CHECK(std::sqrt(sq) == doctest::Approx(1.0).epsilon(1e-6));  // float rounding of the norm
  }
  // The projected gradient is orthogonal to each c_n.
  Grads<double> g(c);
  Params<double> pd(c);
  init_params(pd, 6);
  for (index_t i = 0; i < g.C.size(); ++i) g.C[i] = std::sin(double(i));
  Context<cpu> ctx;
  project_decoder_grads(pd, g, ctx);
  for (index_t n = 0; n < c.n_experts; ++n) {
    double dot = 0;
    for (index_t o = 0; o < c.d_out; ++o) dot += g.C(n, o) * pd.C(n, o);
    CHECK(std::abs(dot) <= 1e-14);
  }
}

TEST_CASE("TopK and skip transcoder gradients match central finite differences, with and "
          "without ranking by decoder norm") {
  for (int variant = 0; variant < 4; ++variant) {
    const bool skip = variant & 1, rank = variant & 2;
    CAPTURE(skip);
    CAPTURE(rank);
    TranscoderConfig c{5, 5, 12, 3, skip, rank};
    TranscoderParams<double> p(c), g(c);
    std::mt19937_64 rng(11);
    std::normal_distribution<double> nd(0, 1);
    p.for_each([&](const char*, Tensor<double>& t) { for (index_t i = 0; i < t.size(); ++i) t[i] = nd(rng); });
    for (index_t i = 0; i < p.b_enc.size(); ++i) p.b_enc[i] += 1.0;  // most latents positive
    Tensor<double> x = random_matrix<double>(4, 5, 12), dy = random_matrix<double>(4, 5, 13);
    Tensor<double> y(4, 5), dx(4, 5);
    TranscoderWorkspace<double> ws;
    transcoder_forward(p, x.view(), y.view(), ws);
    transcoder_backward(p, x.view(), dy.view(), ws, g, dx.view());
    auto probe = [&](std::vector<std::int32_t>& state) {
      TranscoderWorkspace<double> w2;
      Tensor<double> y2(4, 5);
      transcoder_forward(p, x.view(), y2.view(), w2);
      state.assign(w2.topk_idx.data(), w2.topk_idx.data() + w2.topk_idx.size());
      for (index_t i = 0; i < w2.topk_val.size(); ++i) state.push_back(w2.topk_val[i] > 0);
      double l = 0;
      for (index_t i = 0; i < y2.size(); ++i) l += y2[i] * dy[i];
      return l;
    };
    std::vector<std::int32_t> base;
    probe(base);
    std::vector<std::pair<Tensor<double>*, Tensor<double>*>> pairs;
    std::vector<Tensor<double>*> gs;
    g.for_each([&](const char*, Tensor<double>& t) { gs.push_back(&t); });
    std::size_t n = 0;
    p.for_each([&](const char*, Tensor<double>& t) { pairs.push_back({&t, gs[n++]}); });
    pairs.push_back({&x, &dx});
    int checked = 0;
    for (auto [v, gr] : pairs)
      for (index_t i = 0; i < v->size(); ++i) {
        const double keep = (*v)[i], eps = 1e-5;
        std::vector<std::int32_t> su, sd;
        (*v)[i] = keep + eps;
        const double up = probe(su);
        (*v)[i] = keep - eps;
        const double down = probe(sd);
        (*v)[i] = keep;
        if (su != base || sd != base) continue;  // a top-k or relu kink within eps
        CHECK(std::abs((up - down) / (2 * eps) - (*gr)[i]) <= 1e-7 * (1 + std::abs((*gr)[i])));
        ++checked;
      }
    CHECK(checked > 100);
  }
}

TEST_CASE("training on a tiny teacher lowers the loss below a third of its start, deterministically") {
  auto run = [](std::vector<double>& losses) {
    train::Trainer<Params<float>> m = tiny_trainer(7, 3e-3, 10);
    train::Teacher<float> teacher(8, 32, 8, 8, 0);
    train_steps(m, teacher, 0, 150, &losses);
    return m.p;
  };
  std::vector<double> l1, l2;
  const Params<float> a = run(l1), b = run(l2);
  const double start = (l1[0] + l1[1] + l1[2]) / 3, end = (l1[147] + l1[148] + l1[149]) / 3;
  MESSAGE("loss " << start << " -> " << end);
  CHECK(end < start / 3);
  CHECK(l1 == l2);
  CHECK(same_bits(a.C, b.C));
  CHECK(same_bits(a.E, b.E));
}

// The step spelled out, call by call, as train/step.hpp documents it: the oracle of train::step.
template <class Set, class Workspace>
void spelled_out_steps(Set& p, const std::vector<Tensor<double>>& xs,
                       const std::vector<Tensor<double>>& ts, const AdamWConfig& oc,
                       const train::AuxK& aux, index_t units, std::vector<double>& losses) {
  Set g(p.config);
  Workspace ws;
  AdamW<double, cpu, Set> opt(p, oc);
  train::DeadUnits dead(units, aux.enabled() ? aux.dead_window : 1);
  train::AuxKWorkspace<double> aws;
  for (std::size_t s = 0; s < xs.size(); ++s) {
    Tensor<double> y(xs[s].rows(), ts[s].cols()), dy(xs[s].rows(), ts[s].cols());
    forward(p, xs[s].view(), y.view(), ws);
    losses.push_back(loss<double>(Loss::nmse_ref, y.view(), ts[s].view(), dy.view()));
    backward(p, xs[s].view(), dy.view(), ws, g);
    if (aux.enabled()) {
      train::auxk_backward(p, xs[s].view(), y.view(), ts[s].view(), ws, dead, aux, aws, g);
      dead.record(ws.topk_idx.view(), ws.topk_val.view());
    }
    project_decoder_grads(p, g, ws.ctx);
    opt.step(p, g, ws.ctx);
    normalize_decoder(p, ws.ctx);
  }
}

TEST_CASE("train::step is the spelled-out step, bit for bit, for the MxD and both transcoders, with and without AuxK") {
  std::vector<Tensor<double>> xs, ts;
  for (int s = 0; s < 5; ++s) {
    xs.push_back(random_matrix<double>(24, 8, 900 + s));
    ts.push_back(random_matrix<double>(24, 8, 950 + s));
  }
  AdamWConfig oc;
  oc.lr = 1e-2;
  oc.warmup_steps = 2;
  for (const index_t aux_k : {0, 6}) {
    CAPTURE(aux_k);
    train::StepOptions so;
    so.aux.k = aux_k;
    so.aux.dead_window = 48;  // dead after two batches unseen
    auto check = [&](auto p0, index_t units) {
      using Set = decltype(p0);
      std::vector<double> want;
      Set ref = p0;
      spelled_out_steps<Set, typename train::workspace_of<Set>::type>(ref, xs, ts, oc, so.aux, units,
                                                                      want);
      train::Trainer<Set> m(p0, oc, so);
      for (std::size_t s = 0; s < xs.size(); ++s)
        CHECK(train::step(m, xs[s].view(), ts[s].view()) == want[s]);
      m.p.for_each([&](const char* name, const Tensor<double>& t) {
        ref.for_each([&](const char* n2, const Tensor<double>& r) {
          if (std::strcmp(name, n2) == 0) {
            CAPTURE(name);
            CHECK(same_bits(t, r));
          }
        });
      });
      if (aux_k > 0) CHECK(m.dead.count() > 0);
    };
    Config c = tiny_config();
    c.k = 3;
    Params<double> p = random_params<double>(c, 31);
    check(p, c.n_experts);
    for (const bool skip : {false, true}) {
      CAPTURE(skip);
      TranscoderParams<double> tp(TranscoderConfig{8, 8, 64, 3, skip});
      init_transcoder(tp, 32);
      check(tp, index_t(64));
    }
  }
}

TEST_CASE("a non-finite loss stops train::step before backward: no weight, moment or step count changes") {
  train::Trainer<Params<double>> m(random_params<double>(tiny_config(), 33), AdamWConfig{});
  const Params<double> before = m.p;
  Tensor<double> x = random_matrix<double>(6, 8, 34), t(6, 8);  // zero targets: nmse_ref is Inf
  CHECK(error_of([&] { train::step(m, x.view(), t.view()); }) ==
        "the loss became inf (no weight was updated)");
  CHECK(m.opt.t == 0);
  CHECK(same_bits(m.p.C, before.C));
  CHECK(same_bits(m.p.E, before.E));
}

TEST_CASE("checkpoint round trip is bit-exact and a resumed run equals an uninterrupted one") {
  AdamWConfig oc;
  oc.lr = 3e-3;
  oc.warmup_steps = 4;
  train::Teacher<float> teacher(8, 32, 8, 9, 0);
  Params<float> straight(tiny_config());
  init_params(straight, 10);
  train::Trainer<Params<float>> whole(straight, oc), first(straight, oc);
  train_steps(whole, teacher, 0, 12);
  train_steps(first, teacher, 0, 6);
  const std::string path = scratch_path("resume.safetensors").string();
  io::save_checkpoint(path, first.p, &first.opt);
  io::SafetensorsReader f(path);
  CHECK(f.metadata().at("model") == "mxd");
  train::Trainer<Params<float>> second(io::load_params<float>(f, io::read_config(f)), oc);
  io::load_optimizer(f, second.opt);
  CHECK(second.opt.t == 6);
  CHECK(same_bits_all(second.p, first.p));
  CHECK(same_bits_all(second.opt.m, first.opt.m));
  CHECK(same_bits_all(second.opt.v, first.opt.v));
  train_steps(second, teacher, 6, 6);
  CHECK(same_bits_all(second.p, whole.p));
  CHECK(same_bits_all(second.opt.v, whole.opt.v));
}

TEST_CASE("a transcoder checkpoint uses the authors' layout and round-trips") {
  TranscoderParams<float> p(TranscoderConfig{6, 6, 20, 3, false});
  init_transcoder(p, 1);
  AdamW<float, cpu, TranscoderParams<float>> opt(p, AdamWConfig{});
  const std::string path = scratch_path("tc.safetensors").string();
  io::save_checkpoint(path, p, &opt);
  io::SafetensorsReader f(path);
  CHECK(f.info("W_enc").shape == std::vector<std::int64_t>{6, 20});  // [d_in, n_latents]
  CHECK(f.info("W_dec").shape == std::vector<std::int64_t>{20, 6});
  CHECK(f.info("b_enc").shape == std::vector<std::int64_t>{20});
  const TranscoderConfig c = io::read_transcoder_config(f);
  CHECK(c.n_latents == 20);
  CHECK(c.k == 3);
  CHECK(same_bits_all(io::load_transcoder<float>(f, c), p));
  CHECK(!c.rank_by_decoder_norm);
  CHECK(f.metadata().count("rank_by_decoder_norm") == 0);  // a plain file stays as it was
  CHECK(error_of([&] { io::read_config(f); }).find("'topk_transcoder' model, not an MxD") != std::string::npos);
  // Ranking by decoder norm changes the model's selection, so it travels with the file.
  p.config.rank_by_decoder_norm = true;
  io::save_checkpoint(path, p, &opt);
  io::SafetensorsReader g(path);
  CHECK(io::read_transcoder_config(g).rank_by_decoder_norm);
}

TEST_CASE("corrupt checkpoints and data files give clear errors") {
  Params<float> p(tiny_config());
  init_params(p, 1);
  const std::string path = scratch_path("plain.safetensors").string();
  io::save_checkpoint(path, p);  // no optimizer state
  io::SafetensorsReader f(path);
  AdamW<float> opt(p, AdamWConfig{});
  CHECK(error_of([&] { io::load_optimizer(f, opt); }).find("no optimizer state") != std::string::npos);
  CHECK(error_of([&] { io::read_transcoder_config(f); }).find("not a transcoder checkpoint") != std::string::npos);

  std::string bytes;
  {
    std::ifstream in(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  const std::string cut = scratch_path("cut.safetensors").string();
  {
    std::ofstream out(cut, std::ios::binary);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size() / 2));
  }
  CHECK(error_of([&] { io::SafetensorsReader r(cut); }).find("cut.safetensors") != std::string::npos);

  // Data files: x and y with different row counts, and a missing y.
  io::SafetensorsWriter w;
  const float v[12] = {};
  w.add("x", {3, 4}, v);
  w.add("y", {2, 4}, v);
  const std::string bad = scratch_path("bad_data.safetensors").string();
  w.write(bad);
  CHECK(error_of([&] { train::ActivationFiles<float> d({bad}, 0.1, 0); }).find("same T") != std::string::npos);
  io::SafetensorsWriter w2;
  w2.add("x", {3, 4}, v);
  const std::string no_y = scratch_path("no_y.safetensors").string();
  w2.write(no_y);
  CHECK(error_of([&] { train::ActivationFiles<float> d({no_y}, 0.1, 0); }).find("tensor 'y' not found") != std::string::npos);
}

TEST_CASE("activation files stream shuffled training rows and hold out the tail") {
  const index_t T = 20;
  std::vector<float> x(T * 3), y(T * 2);
  for (index_t r = 0; r < T; ++r) {
    for (int i = 0; i < 3; ++i) x[r * 3 + i] = float(r);
    for (int o = 0; o < 2; ++o) y[r * 2 + o] = float(-r);
  }
  io::SafetensorsWriter w;
  w.add("x", {T, 3}, x.data(), io::DType::BF16);  // small integers are exact in bf16
  w.add("y", {T, 2}, y.data(), io::DType::F16);
  const std::string path = scratch_path("acts.safetensors").string();
  w.write(path);
  train::ActivationFiles<float> d({path}, 0.25, 3);
  CHECK(d.eval_rows() == 5);
  Tensor<float> bx, by;
  d.eval_batch(0, 5, bx, by);
  CHECK(bx(0, 0) == 15.f);
  CHECK(by(4, 1) == -19.f);
  // One epoch of training rows visits each of the 15 rows once, x and y paired.
  std::vector<int> seen(T, 0);
  for (int s = 0; s < 3; ++s) {
    d.train_batch(static_cast<std::uint64_t>(s), 5, bx, by);
    for (index_t r = 0; r < 5; ++r) {
      CHECK(by(r, 0) == -bx(r, 2));
      ++seen[static_cast<int>(bx(r, 0))];
    }
  }
  for (index_t r = 0; r < 15; ++r) CHECK(seen[r] == 1);
}
