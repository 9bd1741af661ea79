// SPDX-License-Identifier: MIT
// Google Benchmark suite of the CPU layer: forward, backward, training step (forward + backward
// + AdamW), top-k and gate scores, for GPT-2 small and a small config at batch 1024 and 4096,
// and the training step for 21504 to 262144 experts (BM_train_step_experts).
// Counters: tokens/s, useful GFLOP/s (the FLOPs a sparse-aware layer needs), and the fraction of
// the sgemm/dgemm rate measured in the same build (BM_gemm) that this represents.
#include <chrono>
#include <cstdint>
#include <cmath>
#include <map>
#include <random>
#include <utility>

#include <benchmark/benchmark.h>

#include <mxd/init.hpp>
#include <mxd/mxd.hpp>

#include "layers.hpp"

namespace {

using mxd::index_t;
using mxd_bench::backward_flops;
using mxd_bench::forward_flops;
using mxd_bench::layer_config;

// Measured GEMM rate (GFLOP/s) of a [1024, 768] x [768, 3072] product with the benchmark's
// thread count, memoised per (type, threads).
template <class T>
double gemm_rate(int threads) {
  static std::map<int, double> memo;
  auto it = memo.find(threads);
  if (it != memo.end()) return it->second;
  const index_t M = 1024, K = 768, N = 3072;
  mxd::Tensor<T> a(M, K), b(K, N), c(M, N);
  for (index_t i = 0; i < a.size(); ++i) a[i] = T(0.001) * T(i % 1000);
  for (index_t i = 0; i < b.size(); ++i) b[i] = T(0.002) * T(i % 777);
  mxd::Context<mxd::cpu> ctx;
  ctx.threads = threads;
  double best = 1e30;
  for (int r = 0; r < 5; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    mxd::backend<mxd::cpu>::gemm<T>(ctx, false, false, T(1), a.view(), b.view(), T(0), c.view());
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return memo[threads] = 2.0 * M * K * N / best / 1e9;
}

template <class T>
struct Fixture {
  mxd::Config cfg;
  index_t B;
  mxd::Params<T> p;
  mxd::Grads<T> g;
  mxd::Workspace<T> ws;
  mxd::Tensor<T> x, y, dy, dx;
  mxd::AdamW<T> opt;

  Fixture(const mxd::Config& c, index_t batch, int threads)
      : cfg(c), B(batch), p(c), g(c), x(batch, c.d_in), y(batch, c.d_out), dy(batch, c.d_out),
        dx(batch, c.d_in), opt(p, mxd::AdamWConfig{}) {
    mxd::init_params(p, 0);
    std::mt19937_64 rng(1);
    std::normal_distribution<double> normal(0.0, 1.0);
    for (index_t i = 0; i < p.D.size(); ++i) p.D[i] = T(normal(rng) / std::sqrt(double(c.d_hidden)));
    for (index_t i = 0; i < x.size(); ++i) x[i] = T(normal(rng));
    for (index_t i = 0; i < dy.size(); ++i) dy[i] = T(normal(rng) / double(batch));
    ws.ctx.threads = threads;
  }
  void forward() { mxd::forward<T>(p, x.view(), y.view(), ws); }
  void backward() { mxd::backward<T>(p, x.view(), dy.view(), ws, g, dx.view()); }
};

int bench_threads() {
  mxd::Context<mxd::cpu> c;
  return c.resolved_threads();
}

template <class T>
void report(benchmark::State& st, double flops_per_token, index_t B) {
  const int threads = bench_threads();
  st.counters["tokens/s"] = benchmark::Counter(double(B), benchmark::Counter::kIsIterationInvariantRate);
  st.counters["GFLOP/s"] = benchmark::Counter(flops_per_token * double(B) / 1e9,
                                              benchmark::Counter::kIsIterationInvariantRate);
  st.counters["gemm_GFLOP/s"] = gemm_rate<T>(threads);
  st.counters["threads"] = threads;
}

template <class T>
void BM_forward(benchmark::State& st) {
  Fixture<T> f(layer_config(int(st.range(0))), st.range(1), 0);
  f.forward();  // warm-up: first-touch page faults of the workspace
  for (auto _ : st) f.forward();
  report<T>(st, forward_flops(f.cfg), f.B);
}

template <class T>
void BM_backward(benchmark::State& st) {
  Fixture<T> f(layer_config(int(st.range(0))), st.range(1), 0);
  f.forward();
  f.backward();  // warm-up
  for (auto _ : st) f.backward();
  report<T>(st, backward_flops(f.cfg), f.B);
}

// Times training steps (forward + backward + AdamW) of f after one warm-up step.
template <class T>
void time_train_steps(benchmark::State& st, Fixture<T>& f) {
  auto step = [&] {
    f.forward();
    f.backward();
    f.opt.step(f.p, f.g, f.ws.ctx);
  };
  step();  // warm-up
  for (auto _ : st) step();
  report<T>(st, forward_flops(f.cfg) + backward_flops(f.cfg), f.B);
  st.counters["workspace_MiB"] = double(f.ws.bytes()) / (1 << 20);
}

template <class T>
void BM_train_step(benchmark::State& st) {
  Fixture<T> f(layer_config(int(st.range(0))), st.range(1), 0);
  time_train_steps(st, f);
}

// Gate scores x G^T, the largest GEMM of the layer, for the whole batch at once.
template <class T>
void BM_gate_scores(benchmark::State& st) {
  Fixture<T> f(layer_config(int(st.range(0))), st.range(1), 0);
  mxd::Tensor<T> s(f.B, f.cfg.n_experts);
  for (auto _ : st)
    mxd::backend<mxd::cpu>::gemm<T>(f.ws.ctx, false, true, T(1), f.x.view(), f.p.G.view(), T(0),
                                    s.view());
  report<T>(st, 2.0 * f.cfg.d_in * f.cfg.n_experts, f.B);
}

// relu(scores + b_gate) and the per-row top-k of the gate scores, for the whole batch at once.
template <class T>
void BM_topk(benchmark::State& st) {
  Fixture<T> f(layer_config(int(st.range(0))), st.range(1), 0);
  mxd::Tensor<T> scores(f.B, f.cfg.n_experts), s(f.B, f.cfg.n_experts);
  mxd::Tensor<std::int32_t> idx(f.B, f.cfg.k);
  mxd::Tensor<T> val(f.B, f.cfg.k);
  mxd::backend<mxd::cpu>::gemm<T>(f.ws.ctx, false, true, T(1), f.x.view(), f.p.G.view(), T(0),
                                  scores.view());
  for (auto _ : st) {
    st.PauseTiming();
    for (index_t i = 0; i < s.size(); ++i) s[i] = scores[i];
    st.ResumeTiming();
    mxd::backend<mxd::cpu>::gate_topk<T>(f.ws.ctx, s.view(), f.p.b_gate.view(), f.cfg.k,
                                         idx.view(), val.view());
  }
  st.counters["rows/s"] = benchmark::Counter(double(f.B), benchmark::Counter::kIsIterationInvariantRate);
}

// A training step at GPT-2 widths as the number of experts grows: time should grow no faster
// than N, and the workspace (gate scores in row tiles) should not grow with B x N.
template <class T>
void BM_train_step_experts(benchmark::State& st) {
  mxd::Config c = layer_config(0);
  c.n_experts = st.range(0);
  Fixture<T> f(c, st.range(1), 0);
  time_train_steps(st, f);
  st.counters["params_MiB"] = double(c.n_params() * index_t(sizeof(T))) / (1 << 20);
}

template <class T>
void BM_gemm(benchmark::State& st) {
  const index_t M = st.range(0), K = 768, N = 3072;
  mxd::Tensor<T> a(M, K), b(K, N), c(M, N);
  mxd::Context<mxd::cpu> ctx;
  for (auto _ : st)
    mxd::backend<mxd::cpu>::gemm<T>(ctx, false, false, T(1), a.view(), b.view(), T(0), c.view());
  st.counters["GFLOP/s"] = benchmark::Counter(2.0 * M * K * N / 1e9,
                                              benchmark::Counter::kIsIterationInvariantRate);
}

void layer_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"gpt2", "batch"});
  for (int which : {0, 1})
    for (int batch : {1024, 4096}) b->Args({which, batch});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

}  // namespace

BENCHMARK_TEMPLATE(BM_gemm, float)->Arg(1024)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_TEMPLATE(BM_gemm, double)->Arg(1024)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_TEMPLATE(BM_gate_scores, float)->Apply(layer_args);
BENCHMARK_TEMPLATE(BM_topk, float)->Apply(layer_args);
BENCHMARK_TEMPLATE(BM_forward, float)->Apply(layer_args);
BENCHMARK_TEMPLATE(BM_forward, double)->Args({1, 1024})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_TEMPLATE(BM_backward, float)->Apply(layer_args);
BENCHMARK_TEMPLATE(BM_backward, double)->Args({1, 1024})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_TEMPLATE(BM_train_step, float)->Apply(layer_args);
BENCHMARK_TEMPLATE(BM_train_step, double)->Args({1, 1024})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_TEMPLATE(BM_train_step_experts, float)
    ->ArgNames({"experts", "batch"})
    ->ArgsProduct({{21504, 65536, 262144}, {1024, 4096}})
    ->Iterations(2)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

BENCHMARK_MAIN();
