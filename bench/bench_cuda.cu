// SPDX-License-Identifier: MIT
// Google Benchmark suite of the CUDA layer: forward, backward and training step of GPT-2 small
// and the small layer at batch 1024 and 4096 in each float GEMM mode (fp32, TF32, bf16), and
// the GPU's own kernels alone: gate top-k, the expert gather (gather_rows) and the expert
// gradients (sort by expert + segment sums). Times are CUDA events around each iteration
// (UseManualTime); without a visible GPU every benchmark reports "no CUDA device is visible".
#include <cmath>
#include <random>

#include <benchmark/benchmark.h>

#include <mxd/cuda.cuh>
#include <mxd/init.hpp>

#include "layers.hpp"

namespace {

using mxd::index_t;
using mxd_bench::backward_flops;
using mxd_bench::forward_flops;
using mxd_bench::layer_config;
using Cuda = mxd::cuda;  // CCCL declares a namespace ::cuda too
using be = mxd::backend<Cuda>;

const mxd::MathMode math_modes[] = {mxd::MathMode::fp32, mxd::MathMode::tf32, mxd::MathMode::bf16};

// A layer on the GPU with its batch, after one warm-up step. args: layer, batch, math mode.
struct Fixture {
  mxd::Config cfg;
  index_t B;
  mxd::Params<float, Cuda> p;
  mxd::Grads<float, Cuda> g;
  mxd::Workspace<float, Cuda> ws;
  mxd::Tensor<float, Cuda> x, y, dy, dx;
  mxd::AdamW<float, Cuda> opt;

  explicit Fixture(const benchmark::State& st)
      : cfg(layer_config(int(st.range(0)))), B(st.range(1)), p(host_params(cfg)), g(cfg),
        x(random(B, cfg.d_in, 1.0)), y(B, cfg.d_out), dy(random(B, cfg.d_out, 1.0 / B)),
        dx(B, cfg.d_in), opt(p, mxd::AdamWConfig{}) {
    ws.ctx.math = math_modes[st.range(2)];
    step();
    ws.ctx.synchronize();
  }
  void forward() { mxd::forward<float>(p, x.view(), y.view(), ws); }
  void backward() { mxd::backward<float>(p, x.view(), dy.view(), ws, g, dx.view()); }
  void step() {
    forward();
    backward();
    opt.step(p, g, ws.ctx);
  }

  // The authors' initialisation, with D (zero after init) given values as in `mxd bench`.
  static mxd::Params<float, Cuda> host_params(const mxd::Config& c) {
    mxd::Params<float> h(c);
    mxd::init_params(h, 0);
    std::mt19937_64 rng(1);
    std::normal_distribution<double> normal(0.0, 1.0 / std::sqrt(double(c.d_hidden)));
    for (index_t i = 0; i < h.D.size(); ++i) h.D[i] = float(normal(rng));
    return mxd::to_device(h);
  }
  static mxd::Tensor<float, Cuda> random(index_t rows, index_t cols, double scale) {
    mxd::Tensor<float> h(rows, cols);
    std::mt19937_64 rng(rows * 7 + cols);
    std::normal_distribution<double> normal(0.0, scale);
    for (index_t i = 0; i < h.size(); ++i) h[i] = float(normal(rng));
    return mxd::to_device(h);
  }
};

// Runs body() once per iteration between two CUDA events on the fixture's stream.
template <class F>
void timed(benchmark::State& st, Fixture& f, F&& body) {
  cudaStream_t s = f.ws.ctx.stream();
  cudaEvent_t start, stop;
  MXD_CUDA_CHECK(cudaEventCreate(&start));
  MXD_CUDA_CHECK(cudaEventCreate(&stop));
  for (auto _ : st) {
    MXD_CUDA_CHECK(cudaEventRecord(start, s));
    body();
    MXD_CUDA_CHECK(cudaEventRecord(stop, s));
    MXD_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    MXD_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    st.SetIterationTime(ms / 1e3);
  }
  f.ws.ctx.synchronize();  // what the timed calls found on the device (non-finite gate scores)
  (void)cudaEventDestroy(start);
  (void)cudaEventDestroy(stop);
  st.counters["tokens/s"] = benchmark::Counter(double(f.B), benchmark::Counter::kIsIterationInvariantRate);
}

bool no_gpu(benchmark::State& st) {
  try {
    if (mxd::cuda_device_count() > 0) return false;
    st.SkipWithError("no CUDA device is visible");
  } catch (const mxd::Error& e) {  // a broken driver: say which error
    st.SkipWithError(e.what());
  }
  return true;
}

void useful_flops(benchmark::State& st, double per_token, index_t B) {
  st.counters["TFLOP/s"] = benchmark::Counter(per_token * double(B) / 1e12,
                                              benchmark::Counter::kIsIterationInvariantRate);
}

void BM_forward(benchmark::State& st) {
  if (no_gpu(st)) return;
  Fixture f(st);
  timed(st, f, [&] { f.forward(); });
  useful_flops(st, forward_flops(f.cfg), f.B);
}

void BM_backward(benchmark::State& st) {
  if (no_gpu(st)) return;
  Fixture f(st);
  timed(st, f, [&] { f.backward(); });
  useful_flops(st, backward_flops(f.cfg), f.B);
}

void BM_train_step(benchmark::State& st) {
  if (no_gpu(st)) return;
  Fixture f(st);
  timed(st, f, [&] { f.step(); });
  useful_flops(st, forward_flops(f.cfg) + backward_flops(f.cfg), f.B);
}

// relu(scores + b) and top-k per row. b = 0: whether the scores are left as they were or relu'd
// in place, every run selects the same.
void BM_gate_topk(benchmark::State& st) {
  if (no_gpu(st)) return;
  Fixture f(st);
  mxd::Tensor<float, Cuda> zero(1, f.cfg.n_experts);
  auto idx = f.ws.topk_idx.view();
  auto val = f.ws.topk_val.view();
  timed(st, f, [&] { be::gate_topk<float>(f.ws.ctx, f.ws.scores.view(), zero.view(), f.cfg.k, idx, val); });
  st.counters["GB/s"] = benchmark::Counter(double(f.ws.scores.bytes()) / 1e9,
                                           benchmark::Counter::kIsIterationInvariantRate);
}

// v = sum_j a_j c_{idx_j} and y = u * v + b_out.
void BM_mix_experts(benchmark::State& st) {
  if (no_gpu(st)) return;
  Fixture f(st);
  timed(st, f, [&] {
    be::gather_rows<float>(f.ws.ctx, f.ws.topk_idx.view(), f.ws.topk_val.view(), f.p.C.view(),
                           f.ws.v.view(), false);
    be::modulate<float>(f.ws.ctx, f.ws.u.view(), f.ws.v.view(), f.p.b_out.view(), f.y.view(), false);
  });
}

// The backward's expert part: sort the B k pairs by expert, then dC, dG, db_gate per segment.
void BM_expert_grads(benchmark::State& st) {
  if (no_gpu(st)) return;
  Fixture f(st);
  auto& ws = f.ws;
  timed(st, f, [&] {
    be::group_by_expert(ws.ctx, ws.topk_idx.view(), f.cfg.n_experts, ws.order.view(), ws.offsets.view());
    be::expert_weight_grads<float>(ws.ctx, ws.topk_idx.view(), ws.topk_val.view(), ws.ds.view(),
                                   ws.order.view(), ws.offsets.view(), ws.dv.view(), f.x.view(),
                                   f.g.C.view(), f.g.G.view(), f.g.b_gate.view(), false);
  });
}

void layer_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"gpt2", "batch", "math"});
  for (int which : {0, 1})
    for (int batch : {1024, 4096})
      for (int math : {0, 1, 2}) b->Args({which, batch, math});
  b->Unit(benchmark::kMillisecond)->UseManualTime();
}

void kernel_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"gpt2", "batch", "math"})->Args({0, 4096, 0});
  b->Unit(benchmark::kMillisecond)->UseManualTime();
}

}  // namespace

BENCHMARK(BM_forward)->Apply(layer_args);
BENCHMARK(BM_backward)->Apply(layer_args);
BENCHMARK(BM_train_step)->Apply(layer_args);
BENCHMARK(BM_gate_topk)->Apply(kernel_args);
BENCHMARK(BM_mix_experts)->Apply(kernel_args);
BENCHMARK(BM_expert_grads)->Apply(kernel_args);

BENCHMARK_MAIN();
