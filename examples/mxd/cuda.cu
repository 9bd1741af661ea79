// SPDX-License-Identifier: MIT
// The mxd tool's GPU side: see cuda.hpp.
#include "cuda.hpp"

#include <cstdio>
#include <vector>

#include <mxd/cuda.cuh>
#include <mxd/train/aux_loss.cuh>
#include <mxd/train/step.hpp>

#include "cli.hpp"

namespace mxd::cli {

void require_cuda() {
  MXD_CHECK(cuda_device_count() > 0, "--device cuda: no CUDA device is visible");
}

namespace {

MathMode math_mode(const std::string& math) {
  if (math == "fp32") return MathMode::fp32;
  if (math == "tf32") return MathMode::tf32;
  if (math == "bf16") return MathMode::bf16;
  throw Error("GEMM math '" + math + "' is not fp32, tf32 or bf16");
}

template <class T, template <class, class> class Set>
class CudaModel final : public DeviceModel<T, Set> {
public:
  CudaModel(const Set<T, cpu>& p, const AdamW<T, cpu, Set<T, cpu>>& opt,
            const train::DeadUnits& dead, const train::StepOptions& options, MathMode math)
      : t(to_device(p), opt.config(), options) {
    t.opt = to_device(opt, t.p);
    t.dead = dead;
    t.ws.ctx.math = math;
  }

  double train_step(const Tensor<T>& hx, const Tensor<T>& ht) override {
    load_batch(hx);
    target.resize(ht.rows(), ht.cols(), false);
    copy_to_device<T>(ht.view(), target.view());
    return train::step(t, x.view(), target.view());
  }

  void predict(const Tensor<T>& hx, Tensor<T>& hy, Tensor<std::int32_t>& idx,
               Tensor<T>& val) override {
    load_batch(hx);
    y.resize(hx.rows(), t.p.config.d_out, false);
    forward(t.p, x.view(), y.view(), t.ws);
    t.ws.ctx.synchronize();
    hy = to_host(y);
    idx = to_host(t.ws.topk_idx);
    val = to_host(t.ws.topk_val);
  }

  void download(Set<T, cpu>& p, AdamW<T, cpu, Set<T, cpu>>& opt, train::DeadUnits& dead) override {
    t.ws.ctx.synchronize();
    p = to_host(t.p);
    opt = to_host(t.opt, p);
    dead = t.dead;
  }

private:
  void load_batch(const Tensor<T>& hx) {
    x.resize(hx.rows(), hx.cols(), false);
    copy_to_device<T>(hx.view(), x.view());
  }

  train::Trainer<Set<T, mxd::cuda>> t;
  Tensor<T, mxd::cuda> x, target, y;
};

}  // namespace

template <class T, template <class, class> class Set>
std::unique_ptr<DeviceModel<T, Set>> make_cuda_model(const Set<T, cpu>& p,
                                                     const AdamW<T, cpu, Set<T, cpu>>& opt,
                                                     const train::DeadUnits& dead,
                                                     const train::StepOptions& options,
                                                     const std::string& math) {
  require_cuda();
  return std::make_unique<CudaModel<T, Set>>(p, opt, dead, options, math_mode(math));
}

template <class T>
CudaTimings bench_cuda(const Params<T>& hp, const Tensor<T>& hx, const Tensor<T>& hdy, int iters,
                       int warmup, const std::string& math, index_t tile_rows, bool verbose) {
  require_cuda();
  const Config& cfg = hp.config;
  Params<T, mxd::cuda> p = to_device(hp);
  Grads<T, mxd::cuda> g(cfg);
  Tensor<T, mxd::cuda> x = to_device(hx), dy = to_device(hdy), y(hx.rows(), cfg.d_out),
      dx(hx.rows(), cfg.d_in);
  Workspace<T, mxd::cuda> ws;
  ws.ctx.math = math_mode(math);
  ws.tile_rows = tile_rows;
  AdamWConfig oc;
  oc.warmup_steps = 0;
  AdamW<T, mxd::cuda> opt(p, oc);

  cudaStream_t s = ws.ctx.stream();
  cudaEvent_t ev[4];
  for (auto& e : ev) MXD_CUDA_CHECK(cudaEventCreate(&e));
  std::vector<double> f, b, st;
  for (int it = 0; it < warmup + iters; ++it) {
    MXD_CUDA_CHECK(cudaEventRecord(ev[0], s));
    forward<T>(p, x.view(), y.view(), ws);
    MXD_CUDA_CHECK(cudaEventRecord(ev[1], s));
    backward<T>(p, x.view(), dy.view(), ws, g, dx.view());  // with dx, as on the CPU
    MXD_CUDA_CHECK(cudaEventRecord(ev[2], s));
    opt.step(p, g, ws.ctx);
    MXD_CUDA_CHECK(cudaEventRecord(ev[3], s));
    MXD_CUDA_CHECK(cudaEventSynchronize(ev[3]));
    float t01 = 0, t12 = 0, t03 = 0;
    MXD_CUDA_CHECK(cudaEventElapsedTime(&t01, ev[0], ev[1]));
    MXD_CUDA_CHECK(cudaEventElapsedTime(&t12, ev[1], ev[2]));
    MXD_CUDA_CHECK(cudaEventElapsedTime(&t03, ev[0], ev[3]));
    if (verbose)
      std::fprintf(stderr, "  iter %d%s: forward %.3f ms, backward %.3f ms, step %.3f ms\n", it,
                   it < warmup ? " (warm-up)" : "", t01, t12, t03);
    if (it < warmup) continue;
    f.push_back(t01);
    b.push_back(t12);
    st.push_back(t03);
  }
  for (auto& e : ev) (void)cudaEventDestroy(e);
  ws.ctx.synchronize();  // what the steps found on the device (non-finite gate scores)
  cudaDeviceProp prop{};
  int device = 0;
  MXD_CUDA_CHECK(cudaGetDevice(&device));
  MXD_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return {median(f), median(b), median(st), ws.bytes(), ws.scores.rows(), prop.name};
}

MXD_CLI_CUDA_INSTANTIATIONS

}  // namespace mxd::cli
