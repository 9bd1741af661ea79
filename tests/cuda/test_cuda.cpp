// SPDX-License-Identifier: MIT
// backend<cuda> against the golden files and against backend<cpu>: f64 within 1e-10, f32
// within 1e-4 (testing.hpp's budgets: the GPU differs from the CPU only by rounding), top-k
// indices equal wherever the selected score is positive, and identical bits run to run.
#include <doctest/doctest.h>

#include <driver_types.h>  // cudaError_t's codes, for the device-count verdicts

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

#include <mxd/io/checkpoint.hpp>

#include "../testing.hpp"
#include "runs.hpp"

using namespace mxd;
using namespace mxd_test;
namespace cu = mxd_cuda_test;

namespace {

template <class T>
struct CpuRun {
  Tensor<T> y, dx;
  Grads<T> g;
  Workspace<T> ws;
};

template <class T>
CpuRun<T> cpu_layer(const Params<T>& p, const Tensor<T>& x, const Tensor<T>& dy,
                    const Steering* s = nullptr, bool accumulate_twice = false) {
  CpuRun<T> r{Tensor<T>(x.rows(), p.config.d_out), Tensor<T>(x.rows(), p.config.d_in),
              Grads<T>(p.config), {}};
  forward<T>(p, x.view(), r.y.view(), r.ws, s);
  backward<T>(p, x.view(), dy.view(), r.ws, r.g, r.dx.view());
  if (accumulate_twice) backward<T>(p, x.view(), dy.view(), r.ws, r.g, r.dx.view(), GradMode::Accumulate);
  return r;
}

template <class T>
std::vector<const Tensor<T>*> tensors_of(const Params<T>& p) {
  std::vector<const Tensor<T>*> v;
  p.for_each([&](const char*, const Tensor<T>& t) { v.push_back(&t); });
  return v;
}

template <class T>
std::vector<std::string> names_of(const Params<T>& p) {
  std::vector<std::string> v;
  p.for_each([&](const char* n, const Tensor<T>&) { v.emplace_back(n); });
  return v;
}

// Every tensor of `got` within relative error `tol` of `want`'s, each check naming its tensor.
template <class T>
void check_close(const Params<T>& got, const Params<T>& want, double tol) {
  const auto g = tensors_of(got), w = tensors_of(want);
  const auto names = names_of(want);
  REQUIRE(g.size() == w.size());
  for (std::size_t i = 0; i < w.size(); ++i) {
    CAPTURE(names[i]);
    CHECK(rel_error(g[i]->data(), w[i]->data(), w[i]->size()) <= tol);
  }
}

// `steps` random batches of B rows: inputs [B, I] and targets [B, O].
template <class T>
void random_batches(int steps, index_t B, index_t I, index_t O, std::uint64_t seed,
                    std::vector<Tensor<T>>& xs, std::vector<Tensor<T>>& ts) {
  for (int s = 0; s < steps; ++s) {
    xs.push_back(random_matrix<T>(B, I, seed + s));
    ts.push_back(random_matrix<T>(B, O, seed + 100 + s));
  }
}

template <class T>
bool same_bits(const Tensor<T>& a, const Tensor<T>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), a.bytes()) == 0;
}

template <class T>
bool same_bits(const Params<T>& a, const Params<T>& b) {
  const auto ta = tensors_of(a), tb = tensors_of(b);
  bool ok = ta.size() == tb.size();
  for (std::size_t i = 0; ok && i < ta.size(); ++i) ok = same_bits(*ta[i], *tb[i]);
  return ok;
}

// The same experts in every row, in any order (rounding may reorder close gate values).
bool same_experts(const Tensor<std::int32_t>& a, const Tensor<std::int32_t>& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
  for (index_t r = 0; r < a.rows(); ++r) {
    std::vector<std::int32_t> ra(a.data() + r * a.cols(), a.data() + (r + 1) * a.cols());
    std::vector<std::int32_t> rb(b.data() + r * b.cols(), b.data() + (r + 1) * b.cols());
    std::sort(ra.begin(), ra.end());
    std::sort(rb.begin(), rb.end());
    if (ra != rb) return false;
  }
  return true;
}

// Indices equal wherever the CPU's selected value is positive (elsewhere ties are all zero).
template <class T>
void check_selection(const Tensor<std::int32_t>& idx, const Tensor<T>& val,
                     const Tensor<std::int32_t>& cpu_idx, const Tensor<T>& cpu_val, double tol) {
  REQUIRE(idx.size() == cpu_idx.size());
  CHECK(rel_error(val.data(), cpu_val.data(), val.size()) <= tol);
  int positive = 0, equal = 0;
  for (index_t i = 0; i < idx.size(); ++i)
    if (cpu_val[i] > T(0)) {
      ++positive;
      equal += idx[i] == cpu_idx[i];
    }
  CHECK(equal == positive);
}

// The device run of one layer equals the CPU's: output, selection, dx and every gradient.
template <class T>
void check_against_cpu(const Params<T>& p, const Tensor<T>& x, const Tensor<T>& dy,
                       const cu::LayerOptions& options = {}, double tol = tolerance<T>()) {
  const cu::LayerResult<T> d = cu::layer(p, x, dy, options);
  const CpuRun<T> c = cpu_layer(p, x, dy, options.steering, options.accumulate_twice);
  CHECK(rel_error(d.y.data(), c.y.data(), c.y.size()) <= tol);
  CHECK(rel_error(d.dx.data(), c.dx.data(), c.dx.size()) <= tol);
  check_selection(d.idx, d.val, c.ws.topk_idx, c.ws.topk_val, tol);
  const auto gd = tensors_of(d.g), gc = tensors_of(c.g);
  const auto names = names_of(c.g);
  for (std::size_t i = 0; i < gc.size(); ++i) {
    CAPTURE(names[i]);
    CHECK(rel_error(gd[i]->data(), gc[i]->data(), gc[i]->size()) <= tol);
  }
}

// Every 32nd expert gets a gate bias 16 above the rest (512 experts, k = 16): rounding the
// scores (~N(0, 1)) in TF32 or bf16 cannot change which experts are selected, so runs in
// different math modes differ by rounding alone.
Params<float> separated_gate(Params<float> p) {
  for (index_t n = 0; n < p.config.n_experts; ++n) p.b_gate[n] = n % 32 == 0 ? 8.0f : -8.0f;
  return p;
}

// x rounded to bf16 as the bf16 GEMM's __float2bfloat16_rn does: nearest, ties to even (x finite).
float round_to_bf16(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  u += 0x7fffu + ((u >> 16) & 1u);
  u &= 0xffff0000u;
  std::memcpy(&x, &u, sizeof u);
  return x;
}

// The gate scores of gate_topk's tests: B rows of N scores on a coarse grid (many exact ties).
template <class T>
Tensor<T> coarse_scores(index_t B, index_t N, std::uint64_t seed) {
  Tensor<T> scores(B, N);
  std::mt19937_64 rng(seed);
  for (index_t i = 0; i < scores.size(); ++i) scores[i] = T(int(rng() % 21) - 10) / T(4);
  return scores;
}

// Distinct gate scores: B rows of N normal draws (ties only by chance).
template <class T>
Tensor<T> normal_scores(index_t B, index_t N, std::uint64_t seed) {
  Tensor<T> scores(B, N);
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  for (index_t i = 0; i < scores.size(); ++i) scores[i] = T(normal(rng));
  return scores;
}

Config layer_config(index_t I, index_t H, index_t O, index_t N, index_t k, Activation a,
                    bool glu = false, bool skip = false) {
  Config c;
  c.d_in = I; c.d_hidden = H; c.d_out = O; c.n_experts = N; c.k = k;
  c.activation = a; c.glu = glu; c.skip = skip;
  c.validate();
  return c;
}

}  // namespace

TEST_CASE("CUDA failures surface as mxd::Error naming the call, with or without a GPU") {
  const std::string e = cu::impossible_allocation_error();
  CHECK(e.find("cudaMalloc") != std::string::npos);
  CHECK(e.find("failed: cuda") != std::string::npos);  // the error's name follows
}

TEST_CASE("only 'no GPU' or 'no driver' counts as zero devices; a broken driver is an error "
          "naming the CUDA error") {
  CHECK(cu::device_count_verdict(cudaSuccess, 2, 13000) == 2);
  CHECK(cu::device_count_verdict(cudaErrorNoDevice, 0, 13000) == 0);
  CHECK(cu::device_count_verdict(cudaErrorInsufficientDriver, 0, 0) == 0);  // none installed
  const std::string old = error_of([] { cu::device_count_verdict(cudaErrorInsufficientDriver, 0, 12020); });
  CHECK(old.find("cudaGetDeviceCount failed: cudaErrorInsufficientDriver") != std::string::npos);
  CHECK(old.find("driver supports CUDA 12.2") != std::string::npos);
  const std::string busy = error_of([] { cu::device_count_verdict(cudaErrorDevicesUnavailable, 0, 13000); });
  CHECK(busy.find("cudaErrorDevicesUnavailable") != std::string::npos);
  CHECK_NOTHROW(cu::device_count());  // whatever this machine has, it is no broken driver
}

TEST_SUITE("gpu") {

TEST_CASE_TEMPLATE("golden cases on the GPU: output, selection, every gradient and dx", T, float,
                   double) {
  for (const std::string& name : golden_cases()) {
    CAPTURE(name);
    io::SafetensorsReader f(data_path(name + ".safetensors"));
    const Config cfg = io::read_config(f);
    const Params<T> p = io::load_params<T>(f, cfg);
    const Tensor<T> x = io::read_matrix<T>(f, "x", cfg.d_in), dy = io::read_matrix<T>(f, "dy", cfg.d_out);
    const cu::LayerResult<T> r = cu::layer(p, x, dy);
    const auto y = f.read_all<double>("y");
    CHECK(rel_error(r.y.data(), y.data(), y.size()) <= tolerance<T>());
    const auto idx = f.read_all<std::int64_t>("topk_indices");
    const auto val = f.read_all<double>("topk_values");
    REQUIRE(idx.size() == static_cast<std::size_t>(r.idx.size()));
    CHECK(rel_error(r.val.data(), val.data(), val.size()) <= tolerance<T>());
    for (std::size_t i = 0; i < idx.size(); ++i)
      if (val[i] > 0) CHECK(r.idx.data()[i] == idx[i]);
    const auto gx = f.read_all<double>("grad.x");
    CHECK(rel_error(r.dx.data(), gx.data(), gx.size()) <= tolerance<T>());
    const auto errors = golden_grad_errors(f, r.g);
    for (const auto& [pname, error] : errors) {
      CAPTURE(pname);
      CHECK(error <= tolerance<T>());
    }
    CHECK(errors.size() == 7u + 2 * cfg.glu + cfg.skip);
  }
}

TEST_CASE_TEMPLATE("every layer variant equals the CPU backend", T, float, double) {
  const Activation acts[] = {Activation::relu, Activation::gelu, Activation::gelu_tanh,
                             Activation::sigmoid, Activation::silu};
  int seed = 0;
  for (Activation a : acts)
    for (bool glu : {false, true})
      for (bool skip : {false, true}) {
        const std::string act = activation_name(a);
        CAPTURE(act);
        CAPTURE(glu);
        CAPTURE(skip);
        const Config c = layer_config(24, 72, 24, 300, 8, a, glu, skip);
        ++seed;
        check_against_cpu(random_params<T>(c, seed), random_matrix<T>(37, 24, 100 + seed),
                          random_matrix<T>(37, 24, 200 + seed));
      }
}

TEST_CASE_TEMPLATE("batch 1, k = 1, k = n_experts and large k equal the CPU backend", T, float,
                   double) {
  struct Shape { index_t B, N, k; };
  // k = 1000 and 1000 of 1000 rank in the block; k = 2000 and 3000 of 3000 go through the
  // segmented sort.
  const Shape shapes[] = {{1, 64, 4},     {5, 64, 1},      {6, 40, 40},     {3, 4096, 300},
                          {2, 1000, 1000}, {9, 20000, 32}, {4, 5000, 2000}, {2, 3000, 3000}};
  int seed = 50;
  for (const Shape& s : shapes) {
    CAPTURE(s.B);
    CAPTURE(s.N);
    CAPTURE(s.k);
    const Config c = layer_config(16, 48, 12, s.N, s.k, Activation::gelu);
    ++seed;
    check_against_cpu(random_params<T>(c, seed), random_matrix<T>(s.B, 16, 300 + seed),
                      random_matrix<T>(s.B, 12, 400 + seed));
  }
}

TEST_CASE_TEMPLATE("TopK and skip transcoders on the GPU equal the CPU's, with and without "
                   "ranking by decoder norm", T, float, double) {
  for (int variant = 0; variant < 4; ++variant) {
    const bool skip = variant & 1, rank = variant & 2;
    CAPTURE(skip);
    CAPTURE(rank);
    TranscoderParams<T> p(TranscoderConfig{12, 12, 96, 6, skip, rank});
    init_transcoder(p, 81);
    std::mt19937_64 rng(82);
    fill_normal(p.b_enc, rng, 0.1, 0.2);  // mostly positive latents, so gradients flow
    if (skip) fill_normal(p.W_skip, rng, 0.3);
    if (rank) {  // decoder norms spread from 0.2 to 5: the ranking moves the selection
      fill_normal(p.W_dec, rng, 0.3);
      for (index_t m = 0; m < 96; ++m)
        for (index_t o = 0; o < 12; ++o) p.W_dec(m, o) *= T(0.2 + 0.05 * double(m));
    }
    const Tensor<T> x = random_matrix<T>(19, 12, 83), dy = random_matrix<T>(19, 12, 84);
    const cu::TranscoderResult<T> d = cu::transcoder(p, x, dy);
    TranscoderParams<T> g(p.config);
    TranscoderWorkspace<T> ws;
    Tensor<T> y(19, 12), dx(19, 12);
    transcoder_forward<T>(p, x.view(), y.view(), ws);
    transcoder_backward<T>(p, x.view(), dy.view(), ws, g, dx.view());
    CHECK(rel_error(d.y.data(), y.data(), y.size()) <= tolerance<T>());
    CHECK(rel_error(d.dx.data(), dx.data(), dx.size()) <= tolerance<T>());
    std::vector<const Tensor<T>*> gd, gc;
    d.g.for_each([&](const char*, const Tensor<T>& t) { gd.push_back(&t); });
    g.for_each([&](const char*, const Tensor<T>& t) { gc.push_back(&t); });
    REQUIRE(gd.size() == gc.size());
    for (std::size_t i = 0; i < gc.size(); ++i)
      CHECK(rel_error(gd[i]->data(), gc[i]->data(), gc[i]->size()) <= tolerance<T>());
  }
}

TEST_CASE("two GPU runs give identical bits") {
  const Config c = layer_config(48, 300, 40, 1500, 24, Activation::gelu, true);
  const Params<float> p = random_params<float>(c, 7);
  const Tensor<float> x = random_matrix<float>(600, 48, 8), dy = random_matrix<float>(600, 40, 9);
  const cu::LayerResult<float> a = cu::layer(p, x, dy), b = cu::layer(p, x, dy);
  CHECK(same_bits(a.y, b.y));
  CHECK(same_bits(a.dx, b.dx));
  CHECK(same_bits(a.idx, b.idx));
  CHECK(same_bits(a.g, b.g));
}

TEST_CASE("Accumulate adds the batch's gradients on the GPU as on the CPU") {
  const Config c = layer_config(6, 10, 6, 20, 5, Activation::relu, false, true);
  cu::LayerOptions o;
  o.accumulate_twice = true;
  check_against_cpu(random_params<double>(c, 3), random_matrix<double>(4, 6, 4),
                    random_matrix<double>(4, 6, 5), o);
}

TEST_CASE("steering edits on the GPU equal the CPU's, gradients included") {
  const Config c = layer_config(12, 30, 10, 50, 4, Activation::gelu);
  const Params<double> p = random_params<double>(c, 21);
  const Tensor<double> x = random_matrix<double>(9, 12, 22), dy = random_matrix<double>(9, 10, 23);
  const CpuRun<double> plain = cpu_layer(p, x, dy);
  const index_t selected = plain.ws.topk_idx(0, 0);
  Steering s;
  s.add(selected, 2.5).add(7, 100.0).clamp(11, -3.0).zero(selected == 3 ? 4 : 3).add(7, 1.0).zero(
      plain.ws.topk_idx(1, 1));
  cu::LayerOptions o;
  o.steering = &s;
  check_against_cpu(p, x, dy, o);
  const cu::LayerResult<double> d = cu::layer(p, x, dy, o);
  const CpuRun<double> cs = cpu_layer(p, x, dy, &s);
  CHECK(same_bits(d.idx, cs.ws.topk_idx));
  CHECK(rel_error(d.coef.data(), cs.ws.coef.data(), cs.ws.coef.size()) <= 1e-12);
}

TEST_CASE_TEMPLATE("steering with k > 1024 equals the CPU: the sorted selection lands in "
                   "rows of k + edits", T, float, double) {
  // The segmented-sort path scatters the selection into idx and val, whose leading dimension
  // is k + edits here (the edits' slots follow each row's k).
  const Config c = layer_config(12, 30, 10, 3000, 1100, Activation::gelu);
  const Params<T> p = random_params<T>(c, 24);
  const Tensor<T> x = random_matrix<T>(5, 12, 25), dy = random_matrix<T>(5, 10, 26);
  Steering s;
  s.add(cpu_layer(p, x, dy).ws.topk_idx(0, 0), 2.5).add(2999, 50.0).zero(7);
  cu::LayerOptions o;
  o.steering = &s;
  check_against_cpu(p, x, dy, o);
  const cu::LayerResult<T> d = cu::layer(p, x, dy, o);
  const CpuRun<T> cs = cpu_layer(p, x, dy, &s);
  CHECK(d.idx.cols() == 1103);
  CHECK(same_bits(d.idx, cs.ws.topk_idx));
  CHECK(rel_error(d.coef.data(), cs.ws.coef.data(), cs.ws.coef.size()) <= tolerance<T>());
}

TEST_CASE("TF32 GEMMs stay within TF32 rounding of the exact float layer") {
  const Config c = layer_config(64, 256, 64, 512, 16, Activation::gelu);
  const Params<float> p = separated_gate(random_params<float>(c, 31));
  const Tensor<float> x = random_matrix<float>(128, 64, 32), dy = random_matrix<float>(128, 64, 33);
  cu::LayerOptions o;
  o.tf32 = true;
  const cu::LayerResult<float> t = cu::layer(p, x, dy, o), f = cu::layer(p, x, dy);
  // TF32 keeps 10 mantissa bits (2^-11 ~ 5e-4 per input); sums over 64-256 terms stay ~1e-2.
  CHECK(rel_error(t.y.data(), f.y.data(), f.y.size()) <= 2e-2);
  CHECK(rel_error(t.dx.data(), f.dx.data(), f.dx.size()) <= 2e-2);
  CHECK(rel_error(t.g.E.data(), f.g.E.data(), f.g.E.size()) <= 2e-2);
  // ...and TF32 must have happened: rounding only x and the parameters to TF32 moves y, dx
  // and dE by 3.5e-4 to 5e-4 on the CPU; another fp32 summation order would move them by
  // ~1e-6. 2e-5 tells the two apart, so a mode that did nothing fails here.
  CHECK(rel_error(t.y.data(), f.y.data(), f.y.size()) >= 2e-5);
  CHECK(rel_error(t.dx.data(), f.dx.data(), f.dx.size()) >= 2e-5);
  CHECK(rel_error(t.g.E.data(), f.g.E.data(), f.g.E.size()) >= 2e-5);
  CHECK(same_experts(t.idx, f.idx));  // the separated gate: the same experts in both modes
}

TEST_CASE("bf16 GEMMs stay within bf16 rounding of the exact float layer") {
  const Config c = layer_config(64, 256, 64, 512, 16, Activation::gelu, true, true);
  const Params<float> p = separated_gate(random_params<float>(c, 34));
  const Tensor<float> x = random_matrix<float>(128, 64, 35), dy = random_matrix<float>(128, 64, 36);
  cu::LayerOptions o;
  o.bf16 = true;
  const cu::LayerResult<float> b = cu::layer(p, x, dy, o), f = cu::layer(p, x, dy);
  // bf16 keeps 8 significant bits (2^-9 ~ 2e-3 per input); sums over 64-256 terms stay ~1e-2.
  CHECK(rel_error(b.y.data(), f.y.data(), f.y.size()) <= 5e-2);
  CHECK(rel_error(b.dx.data(), f.dx.data(), f.dx.size()) <= 5e-2);
  CHECK(rel_error(b.g.D.data(), f.g.D.data(), f.g.D.size()) <= 5e-2);
  CHECK(rel_error(b.g.W_glu.data(), f.g.W_glu.data(), f.g.W_glu.size()) <= 5e-2);
  // ...and bf16 must have happened: rounding only x and the parameters to bf16 moves y, dx
  // and dD by 3.4e-3 to 4.2e-3 on the CPU, ten times more than TF32; 2e-4 is far above
  // any fp32 or TF32 result.
  CHECK(rel_error(b.y.data(), f.y.data(), f.y.size()) >= 2e-4);
  CHECK(rel_error(b.dx.data(), f.dx.data(), f.dx.size()) >= 2e-4);
  CHECK(rel_error(b.g.D.data(), f.g.D.data(), f.g.D.size()) >= 2e-4);
  CHECK(same_experts(b.idx, f.idx));
  const cu::LayerResult<float> b2 = cu::layer(p, x, dy, o);
  CHECK(same_bits(b.y, b2.y));  // and still deterministic
  CHECK(same_bits(b.g, b2.g));
}

TEST_CASE_TEMPLATE("gate top-k equals the CPU selection exactly, ties included, into strided "
                   "outputs, with relu and without", T, float, double) {
  // Scores on a coarse grid: many exact ties, broken by the lower index on both devices; half
  // of them negative, and -0 among them, for the selection without relu. Then distinct normal
  // scores, whose k-th value takes every radix pass. The outputs are views of [B, k + 3] (as
  // under steering): ranked in the kernel up to k = 1024, scattered after the segmented sort
  // beyond; the 3 columns after each row stay untouched. N = 30000 rows fit an H100/H200
  // block's shared memory as float (120 KB) and not as double (240 KB), so both kernels run.
  const index_t pad = 3;
  for (bool coarse : {true, false})
  for (index_t N : {3000, 30000})
  for (bool relu : {true, false})
  for (index_t k : {1, 7, 64, 256, 700, 1500}) {
    CAPTURE(coarse);
    CAPTURE(N);
    CAPTURE(relu);
    CAPTURE(k);
    const index_t B = 5;
    Tensor<T> scores = coarse ? coarse_scores<T>(B, N, k) : normal_scores<T>(B, N, k), b(1, N);
    for (index_t n = 0; n < N; n += 97) scores(1, n) = -T(0);
    Tensor<T> cpu_scores = scores;
    Tensor<std::int32_t> idx, cpu_idx(B, k);
    Tensor<T> val, cpu_val(B, k);
    cu::gate_topk(scores, b, k, idx, val, pad, relu);
    Context<cpu> ctx;
    backend<cpu>::gate_topk<T>(ctx, cpu_scores.view(), b.view(), k, cpu_idx.view(),
                               cpu_val.view(), 0, relu);
    REQUIRE(idx.cols() == k + pad);
    int idx_equal = 0, val_equal = 0, pad_untouched = 0;
    for (index_t r = 0; r < B; ++r) {
      for (index_t j = 0; j < k; ++j) {
        idx_equal += idx(r, j) == cpu_idx(r, j);
        val_equal += std::memcmp(&val(r, j), &cpu_val(r, j), sizeof(T)) == 0;
      }
      for (index_t j = k; j < k + pad; ++j) pad_untouched += idx(r, j) == -7 && val(r, j) == T(-7);
    }
    CHECK(idx_equal == B * k);
    CHECK(val_equal == B * k);
    CHECK(pad_untouched == B * pad);
  }
}

TEST_CASE_TEMPLATE("non-finite gate scores are an error naming the first row and expert, as on "
                   "the CPU", T, float, double) {
  const T nan = std::numeric_limits<T>::quiet_NaN(), inf = std::numeric_limits<T>::infinity();
  const Config c = layer_config(8, 16, 6, 40, 4, Activation::gelu);
  const Params<T> p = random_params<T>(c, 91);
  const Tensor<T> dy = random_matrix<T>(6, 6, 92);

  Tensor<T> x = random_matrix<T>(6, 8, 93);
  x(2, 5) = nan;  // every gate score of row 2 is NaN
  CHECK(error_of([&] { cu::layer(p, x, dy); }) == "gate scores: non-finite value at row 2 (expert 0)");

  Params<T> bad_bias = p;
  bad_bias.b_gate[17] = nan;  // expert 17's score in every row
  bad_bias.b_gate[23] = -inf;
  CHECK(error_of([&] { cu::layer(bad_bias, random_matrix<T>(6, 8, 93), dy); }) ==
        "gate scores: non-finite value at row 0 (expert 17)");

  // Scores themselves: +Inf and -Inf count too, in both top-k paths (ranked and sorted).
  for (index_t k : {5, 1500}) {
    CAPTURE(k);
    const index_t B = 6, N = 3000;
    Tensor<T> bad = coarse_scores<T>(B, N, 94), worse = bad;
    const Tensor<T> clean = bad, b(1, N);
    bad(3, 2900) = inf;
    bad(3, 1200) = -inf;
    bad(5, 0) = nan;
    worse(1, 7) = nan;
    // One message per synchronize(), for the lowest row, then expert; a clean call after an
    // error reports nothing, so the context recovers.
    const auto each = cu::gate_topk_errors<T>({bad, clean, worse}, b, k, true);
    REQUIRE(each.size() == 3u);
    CHECK(each[0] == "gate scores: non-finite value at row 3 (expert 1200)");
    CHECK(each[1] == "");
    CHECK(each[2] == "gate scores: non-finite value at row 1 (expert 7)");
    // Two bad calls before one synchronize(): the first call's is reported.
    const auto once = cu::gate_topk_errors<T>({clean, bad, worse}, b, k, false);
    REQUIRE(once.size() == 1u);
    CHECK(once[0] == "gate scores: non-finite value at row 3 (expert 1200)");
  }

  // Training stops at the loss of the step whose batch is bad, before backward and AdamW.
  const std::vector<Tensor<T>> xs{random_matrix<T>(6, 8, 95), x}, ts{dy, dy};
  CHECK(error_of([&] { cu::train(p, xs, ts, AdamWConfig{}, {}); }) ==
        "gate scores: non-finite value at row 2 (expert 0)");
}

TEST_CASE("grouping pairs by expert equals the CPU's counting sort") {
  const index_t B = 257, k = 9, N = 1000;
  Tensor<std::int32_t> idx(B, k);
  std::mt19937_64 rng(5);
  for (index_t i = 0; i < idx.size(); ++i) idx[i] = std::int32_t(rng() % N);
  Tensor<std::int32_t> order, offsets, cpu_order(1, B * k), cpu_offsets(1, N + 1);
  cu::group_by_expert(idx, N, order, offsets);
  Context<cpu> ctx;
  backend<cpu>::group_by_expert(ctx, idx.view(), N, cpu_order.view(), cpu_offsets.view());
  CHECK(same_bits(order, cpu_order));
  CHECK(same_bits(offsets, cpu_offsets));
}

TEST_CASE_TEMPLATE("GEMMs in every transpose and on strided views equal the CPU's", T, float,
                   double) {
  // op(A): [M, K], op(B): [K, N] inside wider tensors (leading dimension > cols).
  const index_t M = 33, K = 17, N = 29;
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      CAPTURE(ta);
      CAPTURE(tb);
      const index_t ar = ta ? K : M, ac = ta ? M : K, br = tb ? N : K, bc = tb ? K : N;
      const Tensor<T> A = random_matrix<T>(ar, ac + 3, 1), B = random_matrix<T>(br, bc + 5, 2);
      Tensor<T> C = random_matrix<T>(M, N + 2, 3), cpu_C = C;
      cu::gemm<T>(ta, tb, T(0.5), A, ar, ac, B, br, bc, T(-2), C, M, N);
      Context<cpu> ctx;
      backend<cpu>::gemm<T>(ctx, ta, tb, T(0.5), View<const T>(A.data(), ar, ac, A.cols()),
                            View<const T>(B.data(), br, bc, B.cols()), T(-2),
                            View<T>(cpu_C.data(), M, N, cpu_C.cols()));
      CHECK(rel_error(C.data(), cpu_C.data(), C.size()) <= tolerance<T>());
      for (index_t r = 0; r < M; ++r)  // the columns outside the view are untouched
        for (index_t j = N; j < N + 2; ++j) CHECK(C(r, j) == cpu_C(r, j));
    }
}

TEST_CASE("TF32 and bf16 GEMMs on strided views round as their modes say, in every transpose") {
  // op(A): [M, K], op(B): [K, N] inside wider tensors, as in the fp32 test above. Against the
  // exact product (double, from the float inputs): rounding the inputs to TF32 moves this
  // result by 2.3e-4 (nearest) to 7.6e-4 (truncation), to bf16 by 1.8e-3 to 2.9e-3, while fp32
  // moves it by ~1e-7. The bf16 result must also equal the exact product of the bf16-rounded
  // inputs up to float accumulation over K = 17 terms (~1e-6).
  const index_t M = 33, K = 17, N = 29;
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      CAPTURE(ta);
      CAPTURE(tb);
      const index_t ar = ta ? K : M, ac = ta ? M : K, br = tb ? N : K, bc = tb ? K : N;
      const Tensor<float> A = random_matrix<float>(ar, ac + 3, 1), B = random_matrix<float>(br, bc + 5, 2);
      const Tensor<float> C0 = random_matrix<float>(M, N + 2, 3);
      auto a = [&](index_t i, index_t k) { return ta ? A(k, i) : A(i, k); };
      auto b = [&](index_t k, index_t j) { return tb ? B(j, k) : B(k, j); };
      std::vector<double> exact, bf16;
      for (index_t i = 0; i < M; ++i)
        for (index_t j = 0; j < N; ++j) {
          double e = 0, r = 0;
          for (index_t k = 0; k < K; ++k) {
            e += double(a(i, k)) * b(k, j);
            r += double(round_to_bf16(a(i, k))) * round_to_bf16(b(k, j));
          }
          exact.push_back(0.5 * e - 2.0 * C0(i, j));
          bf16.push_back(0.5 * r - 2.0 * C0(i, j));
        }
      for (cu::Math math : {cu::Math::tf32, cu::Math::bf16}) {
        const bool is_bf16 = math == cu::Math::bf16;
        CAPTURE(is_bf16);
        Tensor<float> C = C0;
        cu::gemm<float>(ta, tb, 0.5f, A, ar, ac, B, br, bc, -2.0f, C, M, N, math);
        std::vector<float> view;
        int outside_untouched = 0;
        for (index_t r = 0; r < M; ++r) {
          for (index_t j = 0; j < N; ++j) view.push_back(C(r, j));
          for (index_t j = N; j < N + 2; ++j) outside_untouched += C(r, j) == C0(r, j);
        }
        CHECK(outside_untouched == M * 2);
        const double from_exact = rel_error(view.data(), exact.data(), exact.size());
        CHECK(from_exact >= (is_bf16 ? 5e-4 : 2e-5));
        CHECK(from_exact <= (is_bf16 ? 1e-2 : 2e-3));
        if (is_bf16) {
          CHECK(rel_error(view.data(), bf16.data(), bf16.size()) <= 1e-5);
        }
      }
    }
}

TEST_CASE_TEMPLATE("norm_dec's kernels equal the CPU's: gradients lose their part along c_n, "
                   "rows get unit norm", T, float, double) {
  // O = 70 > 32 lanes: each warp loops over its row; row 5 is zero and must stay as it is.
  const index_t N = 300, O = 70;
  Tensor<T> C = random_matrix<T>(N, O, 1), g = random_matrix<T>(N, O, 2);
  for (index_t o = 0; o < O; ++o) C(5, o) = T(0);
  Tensor<T> cpu_C = C, cpu_g = g;
  cu::norm_dec(C, g);
  Context<cpu> ctx;
  backend<cpu>::remove_parallel_rows<T>(ctx, cpu_C.view(), cpu_g.view());
  backend<cpu>::normalize_rows<T>(ctx, cpu_C.view());
  CHECK(rel_error(C.data(), cpu_C.data(), C.size()) <= tolerance<T>());
  CHECK(rel_error(g.data(), cpu_g.data(), g.size()) <= tolerance<T>());
  int zero_row = 0;
  for (index_t o = 0; o < O; ++o) zero_row += C(5, o) == T(0) && g(5, o) == cpu_g(5, o);
  CHECK(zero_row == O);
}

TEST_CASE_TEMPLATE("gradient clipping on the GPU equals the CPU's: the norm to double rounding, "
                   "the scaled gradients to the type's", T, float, double) {
  // 20,000 latents x 8: more values than one block-stride pass of the fixed 256-block grid.
  mxd::TranscoderConfig tc{8, 8, 20000, 4, true};
  mxd::TranscoderParams<T> g(tc);
  index_t seed = 7;
  g.for_each([&](const char*, Tensor<T>& t) { t = random_matrix<T>(t.rows(), t.cols(), seed++); });
  mxd::TranscoderParams<T> cpu_g = g;
  Context<cpu> ctx;
  const double cpu_norm = mxd::train::clip_grad_norm(ctx, cpu_g, 1.0);
  const double norm = cu::clip_grad_norm(g, 1.0);
  CHECK(std::abs(norm - cpu_norm) <= 1e-13 * cpu_norm);  // sums in double, other order
  REQUIRE(cpu_norm > 1.0);  // it clipped
  // The same coefficient to the last bit is not promised (it comes from the norm), so compare
  // to the tensor type's rounding.
  g.for_each([&](const char* name, Tensor<T>& t) {
    CAPTURE(name);
    cpu_g.for_each([&](const char* n2, Tensor<T>& u) {
      if (std::string(name) == n2) CHECK(rel_error(t.data(), u.data(), t.size()) <= tolerance<T>());
    });
  });
}

TEST_CASE_TEMPLATE("device losses and their gradients equal the host losses", T, float, double) {
  const Tensor<T> y = random_matrix<T>(300, 70, 1), t = random_matrix<T>(300, 70, 2);
  for (Loss kind : {Loss::nmse_ref, Loss::mse, Loss::sse, Loss::fvu}) {
    CAPTURE(loss_name(kind));
    Tensor<T> dy, cpu_dy(300, 70);
    const double l = cu::loss(kind, y, t, dy);
    const double cpu_l = loss<T>(kind, y.view(), t.view(), cpu_dy.view());
    // Both sum in double: only the summation order differs.
    CHECK(std::abs(l - cpu_l) <= 1e-12 * std::abs(cpu_l));
    CHECK(rel_error(dy.data(), cpu_dy.data(), dy.size()) <= tolerance<T>());
  }
}

TEST_CASE("AdamW training with norm_dec on the GPU follows the CPU step for step") {
  const Config c = layer_config(16, 40, 12, 200, 6, Activation::gelu);
  const Params<double> p0 = random_params<double>(c, 41);
  std::vector<Tensor<double>> xs, ts;
  random_batches<double>(5, 32, 16, 12, 500, xs, ts);
  AdamWConfig oc;
  oc.lr = 1e-2;
  oc.warmup_steps = 2;
  oc.weight_decay = 0.01;
  const cu::TrainResult<double> d = cu::train(p0, xs, ts, oc, {});

  Params<double> p = p0;
  Grads<double> g(c);
  Workspace<double> ws;
  AdamW<double> opt(p, oc);
  Tensor<double> y(32, 12), dy(32, 12);
  for (int s = 0; s < 5; ++s) {
    forward<double>(p, xs[s].view(), y.view(), ws);
    const double l = loss<double>(Loss::nmse_ref, y.view(), ts[s].view(), dy.view());
    CHECK(std::abs(d.losses[s] - l) <= 1e-10 * l);
    backward<double>(p, xs[s].view(), dy.view(), ws, g);
    project_decoder_grads(p, g, ws.ctx);
    opt.step(p, g, ws.ctx);
    normalize_decoder(p, ws.ctx);
  }
  CHECK(d.opt.t == opt.t);
  check_close(d.p, p, 1e-10);
  check_close(d.opt.m, opt.m, 1e-10);
  check_close(d.opt.v, opt.v, 1e-10);
}

TEST_CASE("train::step with AuxK on the GPU follows the CPU's: losses, dead units, weights") {
  const Config c = layer_config(16, 40, 12, 200, 4, Activation::gelu);
  const Params<double> p0 = random_params<double>(c, 43);
  std::vector<Tensor<double>> xs, ts;
  random_batches<double>(6, 32, 16, 12, 700, xs, ts);
  AdamWConfig oc;
  oc.lr = 1e-2;
  oc.warmup_steps = 0;
  mxd::train::StepOptions so;
  so.aux.k = 8;
  so.aux.dead_window = 64;  // units unseen for two batches are dead from the third step
  const cu::TrainResult<double> d = cu::train(p0, xs, ts, oc, so);
  mxd::train::Trainer<Params<double>> m(p0, oc, so);
  for (int s = 0; s < 6; ++s) {
    CAPTURE(s);
    const double l = mxd::train::step(m, xs[s].view(), ts[s].view());
    CHECK(std::abs(d.losses[s] - l) <= 1e-10 * l);
    CHECK(std::abs(d.aux_losses[s] - m.aux_loss) <= 1e-10 * std::abs(m.aux_loss));
  }
  CHECK(m.aux_loss > 0);  // the aux loss took part
  CHECK(d.dead.tokens_since() == m.dead.tokens_since());
  check_close(d.p, m.p, 1e-10);  // float64: the devices' sums differ in order only
}

TEST_CASE("device copies round-trip bit for bit, so checkpoints are interchangeable") {
  const Config c = layer_config(8, 20, 8, 30, 3, Activation::silu, true, true);
  const Params<float> p = random_params<float>(c, 61);
  CHECK(same_bits(cu::round_trip(p), p));
  AdamW<float> opt(p, AdamWConfig{});
  opt.t = 17;
  opt.m = random_params<float>(c, 62);
  opt.v = random_params<float>(c, 63);
  const AdamW<float> back = cu::round_trip(opt, p);
  CHECK(back.t == 17);
  CHECK(same_bits(back.m, opt.m));
  CHECK(same_bits(back.v, opt.v));
  // A GPU-trained state saved through the host loads as the same bits on the CPU.
  std::vector<Tensor<float>> xs{random_matrix<float>(16, 8, 64)}, ts{random_matrix<float>(16, 8, 65)};
  mxd::train::StepOptions mse;
  mse.loss = Loss::mse;
  mse.norm_dec = false;
  const cu::TrainResult<float> d = cu::train(p, xs, ts, AdamWConfig{}, mse);
  const auto path = scratch_path("gpu_checkpoint.safetensors").string();
  io::save_checkpoint(path, d.p, &d.opt);
  io::SafetensorsReader f(path);
  const Params<float> loaded = io::load_params<float>(f, io::read_config(f));
  AdamW<float> loaded_opt(loaded, AdamWConfig{});
  io::load_optimizer(f, loaded_opt);
  CHECK(same_bits(loaded, d.p));
  CHECK(same_bits(loaded_opt.m, d.opt.m));
  CHECK(loaded_opt.t == 1);
}

TEST_CASE_TEMPLATE("non-finite gradients stop a GPU AdamW step before any update, as on the CPU",
                   T, float, double) {
  Tensor<T> v(300, 500);  // more values than one grid pass: the lowest bad position still wins
  CHECK(cu::find_non_finite(v) == -1);
  v[149999] = std::numeric_limits<T>::infinity();
  v[70001] = std::numeric_limits<T>::quiet_NaN();
  CHECK(cu::find_non_finite(v) == 70001);
  Context<cpu> host;
  CHECK(backend<cpu>::find_non_finite<T>(host, v.view()) == 70001);
  const Config c = layer_config(4, 6, 3, 8, 2, Activation::relu);
  const Params<T> p = random_params<T>(c, 81);
  Params<T> g = random_params<T>(c, 82);
  CHECK(cu::adamw_step_error(p, g) == "");
  g.D(2, 1) = std::numeric_limits<T>::quiet_NaN();
  CHECK(cu::adamw_step_error(p, g) ==
        "gradient of W_dec: non-finite value at row 2 (column 1); no weight was updated");
}

TEST_CASE("a caught CUDA failure is not blamed on the next launch") {
  CHECK(cu::impossible_allocation_error().find("cudaErrorMemoryAllocation") != std::string::npos);
  const Config c = layer_config(8, 16, 8, 32, 4, Activation::relu);
  CHECK_NOTHROW(cu::layer(random_params<float>(c, 71), random_matrix<float>(3, 8, 72),
                          random_matrix<float>(3, 8, 73)));
}

TEST_CASE("bad shapes on the GPU throw mxd::Error naming the tensor") {
  const Config c = layer_config(4, 6, 3, 8, 2, Activation::relu);
  const Params<float> p(c);
  const Tensor<float> bad_x(5, 3), dy(5, 3);
  CHECK(error_of([&] { cu::layer(p, bad_x, dy); }).find("x has shape [5, 3]") != std::string::npos);
  const Tensor<float> x(5, 4), bad_dy(5, 4);
  CHECK(error_of([&] { cu::layer(p, x, bad_dy); }).find("dy has shape [5, 4]") != std::string::npos);
}

}  // TEST_SUITE("gpu")
