// SPDX-License-Identifier: MIT
// mxd bench: times forward, backward and a full training step (forward + backward + AdamW) of
// one layer on a random batch, and reports medians after a warm-up. With --json, stdout holds
// exactly one JSON object (compare_torch.py reads it); progress goes to stderr.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <mxd/init.hpp>
#include <mxd/mxd.hpp>

#include "cli.hpp"
#include "commands.hpp"
#include "cuda.hpp"
#include "memory.hpp"

namespace mxd::cli {
namespace {

struct Timings {
  double forward_ms, backward_ms, step_ms;
  std::size_t workspace_bytes;
  index_t tile_rows;  // rows of gate scores held at once
  double gate_gemm_ms = 0;  // the host's x G^T alone, tile by tile as forward computes it
};

// The benchmarked layer and batch: the authors' initialisation, except D (zero after init),
// which gets values so the decoder's products are not trivially zero.
template <class T>
BenchInputs<T> bench_inputs(const Config& cfg, index_t B) {
  BenchInputs<T> in{Params<T>(cfg), Tensor<T>(B, cfg.d_in), Tensor<T>(B, cfg.d_out)};
  init_params(in.p, /*seed=*/0);
  std::mt19937_64 rng(1);
  std::normal_distribution<double> normal(0.0, 1.0);
  const double dscale = 1.0 / std::sqrt(static_cast<double>(cfg.d_hidden));
  for (index_t i = 0; i < in.p.D.size(); ++i) in.p.D[i] = static_cast<T>(dscale * normal(rng));
  for (index_t i = 0; i < in.x.size(); ++i) in.x[i] = static_cast<T>(normal(rng));
  for (index_t i = 0; i < in.dy.size(); ++i) in.dy[i] = static_cast<T>(normal(rng) / B);
  return in;
}

template <class T>
Timings run_cpu(BenchInputs<T> in, int iters, int warmup, int threads, index_t tile_rows,
                bool verbose) {
  const Config& cfg = in.p.config;
  Params<T>& p = in.p;
  Tensor<T>& x = in.x;
  Tensor<T>& dy = in.dy;
  Tensor<T> y(x.rows(), cfg.d_out), dx(x.rows(), cfg.d_in);
  Workspace<T> ws;
  ws.ctx.threads = threads;
  ws.tile_rows = tile_rows;
  Grads<T> g(cfg);
  AdamWConfig oc;
  oc.warmup_steps = 0;
  AdamW<T> opt(p, oc);

  using clock = std::chrono::steady_clock;
  auto ms = [](clock::time_point a, clock::time_point b) {
    return std::chrono::duration<double, std::milli>(b - a).count();
  };
  std::vector<double> f, b, s;
  for (int it = 0; it < warmup + iters; ++it) {
    const auto t0 = clock::now();
    forward<T>(p, x.view(), y.view(), ws);
    const auto t1 = clock::now();
    backward<T>(p, x.view(), dy.view(), ws, g, dx.view());
    const auto t2 = clock::now();
    opt.step(p, g, ws.ctx);
    const auto t3 = clock::now();
    if (verbose)
      std::fprintf(stderr, "  iter %d%s: forward %.1f ms, backward %.1f ms, step %.1f ms\n", it,
                   it < warmup ? " (warm-up)" : "", ms(t0, t1), ms(t1, t2), ms(t0, t3));
    if (it < warmup) continue;
    f.push_back(ms(t0, t1));
    b.push_back(ms(t1, t2));
    s.push_back(ms(t0, t3));
  }
  // The gate GEMM alone (the step's largest product), in forward's tiles, so that its rate
  // can be held against other sgemms and the machine's peak (bench/gate_gemm.py).
  std::vector<double> gg;
  const index_t tile = ws.scores.rows(), B = x.rows();
  for (int it = 0; it < warmup + iters; ++it) {
    const auto t0 = clock::now();
    for (index_t r0 = 0; r0 < B; r0 += tile) {
      const index_t R = std::min(tile, B - r0);
      backend<cpu>::gemm<T>(ws.ctx, false, true, T(1), ConstView<T>(x.data() + r0 * cfg.d_in, R, cfg.d_in),
                            p.G.view(), T(0), View<T>(ws.scores.data(), R, cfg.n_experts));
    }
    if (it >= warmup) gg.push_back(ms(t0, clock::now()));
  }
  return {median(f), median(b), median(s), ws.bytes(), tile, median(gg)};
}

// Peak resident set of this process in KiB: VmHWM, which unlike getrusage's ru_maxrss does not
// carry over the parent's peak across exec (compare_torch.py launches us from a big Python).
double peak_rss_kib() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6));
  return 0;
}

}  // namespace

int run_bench(int argc, char** argv) {
  std::set<std::string> flags = layer_flags();
  flags.insert({"batch", "iters", "warmup", "threads", "dtype", "device", "tile-rows"});
  std::set<std::string> switches = layer_switches();
  switches.insert({"json", "verbose", "tf32"});
  Args args(argc, argv, 2, flags, switches);
  if (args.help()) {
    std::printf("usage: mxd bench [layer flags] [--batch B] [--iters N] [--warmup W] [--threads T]\n"
                "                 [--dtype f32|f64|bf16] [--device cpu|cuda] [--tf32] [--json]\n"
                "                 [--tile-rows R] [--verbose]\n\n"
                "Times forward, backward and a training step (forward + backward + AdamW) of a\n"
                "randomly initialised layer on a random batch; prints medians over --iters after\n"
                "--warmup iterations. Defaults: GPT-2 small (768 -> 3072 -> 768, 21504 experts,\n"
                "k = 32, gelu), batch 1024, 10 iterations, 2 warm-up, all threads, float, cpu.\n\n"
                "layer flags:\n%s"
                "  --device cuda     time on the GPU (CUDA events; needs a CUDA build)\n"
                "  --tf32            with --device cuda: float GEMMs on TF32 tensor cores\n"
                "  --dtype bf16      with --device cuda: float tensors, GEMMs on bf16 copies of\n"
                "                    their inputs with float accumulation\n"
                "  --tile-rows R     rows of gate scores computed at once (rounded up to a\n"
                "                    multiple of 128; default 0: as many as fit 16 MiB,\n"
                "                    or 512 MiB with --device cuda)\n"
                "  --json            print one JSON object on stdout (progress on stderr); its\n"
                "                    state_bytes = parameters, gradients and AdamW moments +\n"
                "                    x, y, dy, dx + workspace: what peak_rss_mib is held against\n",
                layer_flags_help().c_str());
    return 0;
  }
  MXD_CHECK(args.positional().empty(), "mxd bench takes no positional arguments, got '",
            args.positional().front(), "'");
  Config defaults;
  defaults.d_in = 768;
  defaults.d_hidden = 3072;
  defaults.d_out = 768;
  defaults.n_experts = 21504;
  defaults.k = 32;
  defaults.activation = Activation::gelu;
  const Config cfg = layer_config(args, defaults);
  // The timing loop counts warmup + iters in an int; batch rows and tiles are int32 row counts.
  const long long B = args.get_int("batch", 1024, 1, INT32_MAX);
  const long long iters = args.get_int("iters", 10, 1, 1000000000);
  const long long warmup = args.get_int("warmup", 2, 0, 1000000000), threads = threads_arg(args);
  const long long tile_rows = args.get_int("tile-rows", 0, 0, INT32_MAX);
  // f32 / f64 as in `mxd train` and `mxd eval`; float / double accepted as synonyms.
  std::string dtype = args.get("dtype", "f32");
  if (dtype == "float") dtype = "f32";
  if (dtype == "double") dtype = "f64";
  const std::string device = args.get("device", "cpu");
  MXD_CHECK(dtype == "f32" || dtype == "f64" || dtype == "bf16", "--dtype = '",
            args.get("dtype", ""), "' must be f32, f64 or bf16 (or float, double)");
  MXD_CHECK(device == "cpu" || device == "cuda", "--device = '", device, "' must be cpu or cuda");
  const bool json = args.flag("json"), verbose = args.flag("verbose"), tf32 = args.flag("tf32");
  const bool gpu = device == "cuda";
  MXD_CHECK(!tf32 || (gpu && dtype == "f32"), "--tf32 applies to --device cuda --dtype f32 only");
  MXD_CHECK(dtype != "bf16" || gpu, "--dtype bf16 needs --device cuda");
  // How the GPU's float GEMMs run (mxd::MathMode); bf16 keeps float tensors.
  const std::string math = dtype == "bf16" ? "bf16" : tf32 ? "tf32" : "fp32";

  // The host holds the layer, x and dy; on the CPU also the gradients, AdamW moments, y, dx
  // and the workspace (the GPU's own memory is the CUDA allocator's to refuse).
  const double scalar_bytes = dtype == "f64" ? 8 : 4;
  const double inputs = scalar_bytes * (double(cfg.n_params()) + double(B) * double(cfg.d_in + cfg.d_out));
  check_memory(gpu ? inputs
                   : 2 * inputs + 2 * scalar_bytes * double(cfg.n_params()) +
                         (dtype == "f64" ? workspace_bytes<double>(cfg, double(B), tile_rows)
                                         : workspace_bytes<float>(cfg, double(B), tile_rows)),
               gpu ? "the layer, x and dy on the host"
                   : "parameters, gradients, AdamW moments, x, y, dy, dx and the workspace");

  Context<cpu> probe;
  probe.threads = static_cast<int>(threads);
  Timings t;
  std::string gpu_name;
  if (gpu) {
    require_cuda();
    auto run = [&](const auto& in) {
      return bench_cuda(in.p, in.x, in.dy, int(iters), int(warmup), math, index_t(tile_rows),
                        verbose);
    };
    const CudaTimings c =
        dtype == "f64" ? run(bench_inputs<double>(cfg, B)) : run(bench_inputs<float>(cfg, B));
    t = {c.forward_ms, c.backward_ms, c.step_ms, c.workspace_bytes, c.tile_rows};
    gpu_name = c.device_name;
  } else {
    auto run = [&](auto in) {
      return run_cpu(std::move(in), int(iters), int(warmup), int(threads), index_t(tile_rows),
                     verbose);
    };
    t = dtype == "f32" ? run(bench_inputs<float>(cfg, B)) : run(bench_inputs<double>(cfg, B));
  }
  const double peak_rss_mib = peak_rss_kib() / 1024.0;
  const std::size_t scalar = dtype == "f64" ? 8 : 4;
  const std::size_t params_bytes = std::size_t(cfg.n_params()) * scalar;
  const std::size_t io_bytes = std::size_t(B) * std::size_t(2 * cfg.d_in + 2 * cfg.d_out) * scalar;
  const std::size_t state_bytes = 4 * params_bytes + io_bytes + t.workspace_bytes;
  const double gate_gflop = 2e-6 * double(B) * double(cfg.d_in) * double(cfg.n_experts);  // per ms

  if (json) {
    nlohmann::json j;
    j["forward_ms"] = t.forward_ms;
    j["backward_ms"] = t.backward_ms;
    j["step_ms"] = t.step_ms;
    j["tokens_per_s"] = 1e3 * static_cast<double>(B) / t.step_ms;
    j["batch"] = B;
    j["iters"] = iters;
    j["threads"] = gpu ? 0 : probe.resolved_threads();
    j["dtype"] = dtype;
    j["device"] = device;
    if (gpu) {
      j["gpu"] = gpu_name;
      j["math"] = math;
    }
    j["d_in"] = cfg.d_in;
    j["d_hidden"] = cfg.d_hidden;
    j["d_out"] = cfg.d_out;
    j["n_experts"] = cfg.n_experts;
    j["k"] = cfg.k;
    j["workspace_bytes"] = t.workspace_bytes;
    j["tile_rows"] = t.tile_rows;
    j["params_bytes"] = params_bytes;
    j["state_bytes"] = state_bytes;
    j["peak_rss_mib"] = peak_rss_mib;
    if (!gpu) {
      j["gate_gemm_ms"] = t.gate_gemm_ms;
      j["gate_gemm_gflops"] = gate_gflop / t.gate_gemm_ms;
    }
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("mxd bench: I=%lld H=%lld O=%lld N=%lld k=%lld, batch %lld, %s%s, ",
              (long long)cfg.d_in, (long long)cfg.d_hidden, (long long)cfg.d_out,
              (long long)cfg.n_experts, (long long)cfg.k, B, dtype.c_str(),
              gpu ? (" (" + math + " GEMMs)").c_str() : "");
  if (gpu) std::printf("%s\n", gpu_name.c_str());
  else std::printf("%d threads\n", probe.resolved_threads());
  std::printf("  forward   %9.2f ms\n  backward  %9.2f ms\n  step      %9.2f ms  (%.0f tokens/s)\n",
              t.forward_ms, t.backward_ms, t.step_ms, 1e3 * double(B) / t.step_ms);
  std::printf("  workspace %9.1f MiB (gate scores in tiles of %lld rows), peak RSS %.1f MiB,\n"
              "  %.2fx parameters + gradients + moments + activations + workspace\n",
              double(t.workspace_bytes) / (1 << 20), (long long)t.tile_rows, peak_rss_mib,
              peak_rss_mib * (1 << 20) / double(state_bytes));
  if (!gpu)
    std::printf("  gate GEMM %9.2f ms  (x G^T alone, %.1f GFLOP/s)\n", t.gate_gemm_ms,
                gate_gflop / t.gate_gemm_ms);
  return 0;
}

}  // namespace mxd::cli
